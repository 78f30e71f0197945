"""Stage `train`: LoRA/QLoRA on the prepared train split with transformers' Trainer and peft.

Loss is on answer tokens only; validation loss drives early stopping and picks the best checkpoint.
``train.batching`` keeps compute off padding. ``packed`` (what ``auto`` picks) flattens each batch into
one row with per-sequence position ids; attention runs per sequence (variable-length FlashAttention on
CUDA, per-sequence SDPA elsewhere, see :mod:`loraops.modeling.packing`) and logits are computed only where the loss
is. The batches are the same random batches as ``padded``, so the loss is the same number.
``length_grouped`` lets Trainer's length-grouped sampler batch sequences of similar length instead.
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path
from typing import Any

from loraops.core.config import ConfigError, LoraSection, Params, TrainSection
from loraops.core.paths import ADAPTER_DIR, BASE_DIR, CHECKPOINT_DIR, TRAIN_LOG, TRAIN_METRICS, prompts_folder
from loraops.core.readers import load_split
from loraops.core.results import TrainFigures
from loraops.core.utils import atomic_dir, atomic_write, pick_device, progress_lines, say, sha256_dir, write_json
from loraops.modeling import packing, prompting
from loraops.modeling.model import (TINY_BASE, base_config, base_location, build_tiny_base, check_base, load_base,
                                    load_tokenizer, write_base_card)
from loraops.modeling.prompting import PromptFormat


def tokenize_pair(tokenizer: Any, prompt: str, answer: str, max_length: int,
                  fmt: PromptFormat | None = None) -> dict[str, list[int]]:
    """Token ids of the prompt and the answer in ``fmt`` (plain: ``<bos> prompt answer <eos>``; chat: the rendered
    prompt and the assistant turn with its end-of-turn token), labels masked (-100) on everything but the answer."""
    prompt_ids, answer_ids = (fmt or PromptFormat()).pair_ids(tokenizer, prompt, answer)
    if len(prompt_ids) + len(answer_ids) > max_length:
        prompt_ids = _shortened(tokenizer, prompt, prompt_ids, max_length // 2, fmt)
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def _shortened(tokenizer: Any, prompt: str, prompt_ids: list[int], budget: int, fmt: PromptFormat | None) -> list[int]:
    """A prompt cut to ``budget`` tokens keeping its end (the question's end and the answer cue): after the BOS for
    the plain template; under a chat template the start of the user's content is cut, so BOS, the system turn and
    the headers stay as trained and served (unless they alone exceed the budget)."""
    if fmt is None or not fmt.chat:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + prompt_ids[len(bos):][-(budget - len(bos)):]
    head, tail = fmt.around(tokenizer, prompt)
    text = fmt.text(tokenizer, prompt)
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in (head, tail))
    room = budget - len(before) - len(after)
    if not (head or tail) or room <= 0 or not (text.startswith(head) and text.endswith(tail)):
        return prompt_ids[-budget:]
    user = tokenizer(text[len(head): len(text) - len(tail)], add_special_tokens=False)["input_ids"]  # as rendered
    return before + user[-room:] + after


def lora_config(cfg: LoraSection) -> Any:
    """The peft LoraConfig for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None, use_dora=cfg.use_dora, task_type="CAUSAL_LM",
    )


def resolve_batching(requested: str, base_config: Any = None, device: str = "cpu", max_length: int | None = None) -> str:
    """``auto`` → ``packed`` (:func:`loraops.modeling.packing.packed_attention` picks the kernel), or ``padded`` for a base
    whose attention packed rows cannot reproduce on this device (Gemma 2's soft-capped scores, a sliding window
    shorter than ``max_length``; :func:`loraops.modeling.packing.packing_problem`).

    Packing keeps each batch's composition, so the loss is the padded loss without the padding compute.
    ``length_grouped`` is opt-in: it batches sequences of similar length, which in Q&A data with
    paraphrased answers means variants of one source row together — on the sample data it raised the
    validation loss from 1.38 to 1.64.
    """
    if requested != "auto":
        return requested
    problem = packing.packing_problem(base_config, device, max_length) if base_config is not None else None
    if problem:
        say(f"train.batching=auto: padded batches, since this model's attention uses {problem} (packed rows need "
            "flash_attn on CUDA for that)")
        return "padded"
    return "packed"


def collator(tokenizer: Any, packed: bool) -> Any:
    """Padding-free flattening (with the boundaries for varlen attention) when packing, else the padding
    collator (labels padded with -100)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packed:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def precision_choice(cfg: TrainSection, device: str) -> tuple[bool, str]:
    """(bf16?, optimiser): bf16 and fused AdamW on CUDA unless fp32 is asked for; fp32 and AdamW on CPU."""
    bf16 = device == "cuda" and cfg.precision in ("auto", "bf16")
    return bf16, "adamw_torch_fused" if device == "cuda" else "adamw_torch"


def training_args(cfg: TrainSection, seed: int, device: str, out_dir: Path, has_validation: bool,
                  batching: str = "padded") -> Any:
    """TrainingArguments from the train section; bf16 on CUDA (unless fp32 is asked for), fp32 on CPU."""
    from transformers import TrainingArguments

    bf16, optim = precision_choice(cfg, device)
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=1,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=seed,
        data_seed=seed,
        full_determinism=device == "cpu",
        bf16=bf16,
        use_cpu=device == "cpu",
        optim=optim,
        prediction_loss_only=True,
        activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=cfg.dataloader_workers,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random",
        report_to="none",
        disable_tqdm=progress_lines(),
    )


def _history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        row = rows.setdefault(int(entry.get("step", 0)), {"step": int(entry.get("step", 0))})
        for src, dst in (("loss", "train_loss"), ("eval_loss", "val_loss"), ("learning_rate", "learning_rate")):
            if src in entry:
                row[dst] = float(entry[src])
    return [rows[step] for step in sorted(rows) if len(rows[step]) > 1]


def prepare_model(location: str, params: Params, device: str, batching: str) -> Any:
    """The base on ``device`` (4-bit for QLoRA), with packed-row attention when packing, wrapped by peft."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    cfg = params.train
    dtype = "bf16" if device == "cuda" and cfg.precision in ("auto", "bf16") else "fp32"
    model = load_base(location, params.model, device, dtype=dtype, quantization=cfg.quantization)
    if batching == "packed":
        model.set_attn_implementation(packing.packed_attention(device))
    if cfg.quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = params.lora.model_copy(update={"modules_to_save": modules_to_save(model, params.lora.modules_to_save)})
    return get_peft_model(model, lora_config(lora))


def modules_to_save(model: Any, names: list[str]) -> list[str]:
    """``lora.modules_to_save`` in this architecture's own names: ``embed_tokens`` and ``lm_head`` (the Llama names
    params.yaml uses) stand for the input and output embeddings whatever they are called (GPT-NeoX ``embed_in`` /
    ``embed_out``, GPT-2 ``wte``); other names must exist.

    Raises:
        ConfigError: a name that matches no module of the base.
    """
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    roles = {"embed_tokens": model.get_input_embeddings(), "lm_head": model.get_output_embeddings()}
    owner = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    out = []
    for name in names:
        if name in present:
            out.append(name)
        elif name in roles and roles[name] is not None and id(roles[name]) in owner:
            out.append(owner[id(roles[name])])
            say(f"lora.modules_to_save: {name} is {owner[id(roles[name])]} in {type(model).__name__}")
        else:
            raise ConfigError(f"lora.modules_to_save: {name!r} is no module of {type(model).__name__}; its modules "
                              f"include {', '.join(sorted(present - {''})[:12])}")
    return list(dict.fromkeys(out))


def make_trainer(model: Any, tokenizer: Any, cfg: TrainSection, seed: int, device: str, out_dir: Path,
                 train_set: Any, val_set: Any = None, batching: str = "padded", callbacks: list | None = None) -> Any:
    """loraops' Trainer: the collator for ``batching`` and the answer-only loss (logits only where it counts)."""
    from loraops.modeling.trainer import AnswerOnlyTrainer

    return AnswerOnlyTrainer(
        model=model,
        args=training_args(cfg, seed, device, out_dir, val_set is not None, batching),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator(tokenizer, batching == "packed"),
        callbacks=callbacks or [],
    )


def fit(params: Params, train_rows: list[dict], val_rows: list[dict], base: str, device: str, work_dir: Path,
        resume_from: Path | None = None, extra_callbacks: list | None = None, root: Path = Path(".")) -> dict[str, Any]:
    """Train an adapter (continuing ``resume_from``, a Trainer checkpoint, when given); return the trained peft
    model, tokenizer, prompt format, log history and figures."""
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, set_seed

    from loraops.modeling.trainer import LineProgress, fault_injection

    set_seed(params.base.seed)
    cfg = params.train
    tokenizer = load_tokenizer(base, params.model)
    batching = resolve_batching(cfg.batching, base_config(base, params.model), device, params.model.max_length)
    fmt = prompting.resolve(params.data.chat_template, params.data.system_prompt, tokenizer, root)
    if fmt.chat:
        say(f"prompt format: {fmt.describe}")
    model = prepare_model(base, params, device, batching)

    def encode(rows: list[dict]) -> Any:
        return Dataset.from_list([tokenize_pair(tokenizer, r["prompt"], r["answer"], params.model.max_length, fmt)
                                  for r in rows])

    train_set, val_set = encode(train_rows), (encode(val_rows) if val_rows else None)
    callbacks = [EarlyStoppingCallback(cfg.early_stopping_patience)] if val_set is not None and cfg.early_stopping_patience else []
    callbacks += extra_callbacks or []
    if progress_lines():
        callbacks.append(LineProgress())
    fault = fault_injection()
    callbacks += [fault] if fault is not None else []
    cut = sum(len(tokenize_pair(tokenizer, r["prompt"], r["answer"], 10**9, fmt)["input_ids"]) > params.model.max_length
              for r in train_rows)
    if cut:
        say(f"note: {cut} of {len(train_rows)} training pairs are longer than model.max_length={params.model.max_length} "
            "tokens and are cut (the end of their answers is not learned)")
    trainer = make_trainer(model, tokenizer, cfg, params.base.seed, device, work_dir, train_set, val_set, batching, callbacks)
    if progress_lines():
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # its raw dicts repeat what LineProgress says
    started, started_at = time.perf_counter(), time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    tokens = sum(sum(1 for t in ids if t != -100) for ids in train_set["labels"])
    history = _history_rows(trainer.state.log_history)
    val_losses = [row["val_loss"] for row in history if "val_loss" in row]
    figures = {
        "train_loss": round(float(result.training_loss), 6),
        "best_val_loss": round(min(val_losses), 6) if val_losses else None,
        "steps": int(trainer.state.global_step),
        "stopped_early": int(trainer.state.global_step) < cfg.max_steps,
        "train_seconds": round(seconds, 2),
        "started_at": round(started_at, 3),
        "finished_at": round(time.time(), 3),
        "train_pairs": len(train_rows),
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    figures["answer_tokens_per_epoch"] = tokens
    figures["pairs_cut_by_max_length"] = cut
    figures["batching"] = batching
    return {"model": trainer.model, "tokenizer": tokenizer, "format": fmt, "history": history, "figures": figures}


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, fmt: PromptFormat | None = None) -> str:
    """Save the adapter (safetensors), the tokenizer with the chat template it was trained with (none for a plain
    format) and, for a chat format, the format itself, atomically; return the sha256 over its tensors."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if fmt is not None:
            tokenizer.chat_template = fmt.chat_template
        tokenizer.save_pretrained(tmp)
        if fmt is not None and fmt.chat:
            fmt.save(tmp)
        _sort_target_modules(tmp / "adapter_config.json")
    return sha256_dir(out_dir, "*.safetensors")


def _sort_target_modules(path: Path) -> None:
    """peft writes the modules `all-linear` resolved to in set order, which changes with the process's hash
    seed; sorted, the same training gives a byte-identical adapter directory (and DVC hash)."""
    import json

    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


ADDED_SOURCES = ("rule", "teacher", "document")
"""``source`` of the rows stage `augment` added; every other row is an original pair."""


def folds_of(rows: list[dict], k: int, seed: int) -> dict[str, int]:
    """Source group → fold: the original rows' groups shuffled with ``seed`` and dealt round-robin into ``k`` folds."""
    import random

    groups = sorted({r["group"] for r in rows if r.get("source") not in ADDED_SOURCES})
    random.Random(seed).shuffle(groups)
    return {group: i % k for i, group in enumerate(groups)}


def fold_rows(rows: list[dict], fold: dict[str, int], k: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) rows of fold ``k``: held out are the original rows of its groups; training are all rows
    none of whose groups (an added row's origins included) is in it."""
    held = [r for r in rows if r.get("source") not in ADDED_SOURCES and fold.get(r["group"]) == k]
    train = [r for r in rows if all(fold.get(g) != k for g in (r["group"], *r.get("origin_groups", [])))]
    return train, held


def cross_validate(params: Params, rows: list[dict], base: str, device: str, work_dir: Path,
                   reporter: Any = None) -> dict[str, Any]:
    """Grouped k-fold cross-validation over ``rows`` (the train and validation splits; never test): one adapter per
    fold, validated on that fold's groups. Returns each fold's best validation loss and their mean and sd; stops
    early when the sweep's pruner says so after a fold."""
    import gc
    import statistics

    k = params.train.cv_folds
    fold = folds_of(rows, k, params.base.seed)
    if len(set(fold.values())) < k:
        from loraops.core.errors import ConfigError

        raise ConfigError(f"train.cv_folds: {k} folds need at least {k} source groups, the data has {len(fold)}")
    losses: list[float] = []
    for number in range(k):
        train_rows, held = fold_rows(rows, fold, number)
        say(f"cross-validation fold {number + 1}/{k}: {len(train_rows)} training rows, {len(held)} held out "
            f"({sum(v == number for v in fold.values())} groups)")
        out = fit(params, train_rows, held, base, device, work_dir / f"cv-{number}")
        losses.append(out["figures"]["best_val_loss"])
        shutil.rmtree(work_dir / f"cv-{number}", ignore_errors=True)
        del out
        gc.collect()
        if reporter is not None and reporter.report(statistics.fmean(losses), number):
            break
    return {"folds": k, "folds_run": len(losses), "val_loss": losses, "val_loss_mean": round(statistics.fmean(losses), 6),
            "val_loss_sd": round(statistics.stdev(losses), 6) if len(losses) > 1 else 0.0}


IDENTITY_FILE = "identity.json"
"""What a checkpoint folder was trained on: params sections, data digests, process count."""


def training_identity(params: Params, train_rows: list[dict], val_rows: list[dict], processes: int) -> dict[str, Any]:
    """Everything that must match for a checkpoint to continue this training exactly."""
    import hashlib
    import json

    digest = lambda rows: hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    identity = {"params": {s: getattr(params, s).model_dump(mode="json") for s in ("base", "model", "lora", "train")},
                "train_sha256": digest(train_rows), "validation_sha256": digest(val_rows), "processes": processes}
    if params.data.chat_template != "auto" or params.data.system_prompt:
        identity["prompt"] = {"chat_template": params.data.chat_template, "system_prompt": params.data.system_prompt}
    return identity


def resumable(work_dir: Path, identity: dict[str, Any]) -> tuple[Path | None, str]:
    """The latest checkpoint an interrupted run of the same training left, or None and why it cannot be used."""
    import json

    checkpoints = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    complete = [c for c in checkpoints if (c / "trainer_state.json").exists() and (c / "rng_state.pth").exists()]
    if not complete:
        return None, "no checkpoint of an interrupted run in " + str(work_dir)
    try:
        before = json.loads((work_dir / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"{work_dir} has checkpoints but no record of what they were trained on"
    if before.get("processes") != identity["processes"]:
        return None, f"the checkpoint was trained on {before.get('processes')} process(es), this run has {identity['processes']}"
    for key in ("train_sha256", "validation_sha256"):
        if before.get(key) != identity[key]:
            return None, f"the {key.split('_')[0]} split changed since the checkpoint"
    from loraops.core.config import flatten

    old, new = flatten(before.get("params", {})), flatten(identity["params"])
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        return None, "params changed since the checkpoint: " + ", ".join(changed[:5])
    return complete[-1], ""


def _drop_incomplete(work_dir: Path) -> None:
    for checkpoint in work_dir.glob("checkpoint-*"):
        if not ((checkpoint / "trainer_state.json").exists() and (checkpoint / "rng_state.pth").exists()):
            shutil.rmtree(checkpoint, ignore_errors=True)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "train_loss", "val_loss", "learning_rate"])
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def train_folder(params: Params) -> Path:
    """Where the training rows are: with passages (rag.enabled), augmented (augment.enabled) or as prepared."""
    return prompts_folder("train", params.rag.enabled, params.augment.enabled)


def ensure_base(params: Params, root: Path = Path(".")) -> str:
    """Return the base location after writing ``models/base``: the tiny base built from the train split, or for a
    hub or local base a card naming it (the stage's DVC output exists for every base).

    Raises:
        ModelError: ``model.base`` cannot be loaded (checked before any training).
    """
    location = check_base(params.model, root)
    if params.model.base == TINY_BASE:
        texts = [f"{r['prompt']}{r['answer']}" for r in load_split("train", root, train_folder(params))]
        say(f"building the tiny base (tokenizer + {params.model.tiny.layers}-layer Llama) from {len(texts)} training "
            f"texts → {location}")
        started = time.perf_counter()
        build_tiny_base(texts, params.model.tiny, params.base.seed, Path(location))
        say(f"tiny base ready in {time.perf_counter() - started:.1f}s")
    else:
        write_base_card(params.model, location, root / BASE_DIR)
        say(f"base {params.model.base} ({location}); its card → {BASE_DIR}")
    return location


def run(params: Params, root: Path = Path(".")) -> TrainFigures:
    """Train on the prepared splits and write the adapter, curves and figures.

    Under ``accelerate launch`` (DDP, one or several nodes) every process trains; the first process of each node
    makes sure of the base there (builds the tiny one), and only the main process writes the adapter, curves and
    figures. Resuming across nodes needs the checkpoints on a disk every node sees.
    """
    from accelerate import PartialState

    device = pick_device(params.base.device)
    state = PartialState(cpu=device == "cpu")  # cpu=True: torchrun/accelerate workers without CUDA use gloo
    train_rows = load_split("train", root, train_folder(params))
    val_rows = load_split("validation", root, prompts_folder("validation", params.rag.enabled))
    work_dir = root / CHECKPOINT_DIR
    identity = training_identity(params, train_rows, val_rows, state.num_processes)
    resume, why = resumable(work_dir, identity)
    if state.is_local_main_process:  # once per node: nodes may share no disk, and every process loads the base
        ensure_base(params, root)
    if state.is_main_process:
        say(f"resuming from {resume.name} (an interrupted run with the same params and data left it)" if resume
            else f"training from scratch: {why}")
        if resume is None:
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True, exist_ok=True)
            write_json(work_dir / IDENTITY_FILE, identity)
    state.wait_for_everyone()
    from loraops.modeling.trainer import TrialPruning
    from loraops.modeling.trial import Reporter

    reporter = Reporter()  # a sweep trial's train stage reports its validation losses to the trial; else inert
    cv = None
    if params.train.cv_folds:
        cv = cross_validate(params, train_rows + val_rows, base_location(params.model, root), device,
                            work_dir / "cv", reporter if reporter.objective == "cv_val_loss" else None)
        say(f"cross-validation: validation loss {cv['val_loss_mean']:.4f} ± {cv['val_loss_sd']:.4f} over "
            f"{cv['folds_run']} fold(s)")
    callbacks = [TrialPruning(reporter)] if reporter.trial is not None and reporter.objective == "val_loss" else []
    try:
        out = fit(params, train_rows, val_rows, base_location(params.model, root), device, work_dir, resume, callbacks,
                  root)
    except BaseException:
        _drop_incomplete(work_dir)  # a checkpoint cut short (disk full, kill during its save) is never resumed from
        raise
    pruned = reporter.pruned_at is not None if reporter.trial is not None else None
    figures = TrainFigures(**out["figures"], processes=state.num_processes,
                           resumed_from=resume.name if resume else None, cv=cv, pruned=pruned,
                           pruned_at=reporter.pruned_at if reporter.trial is not None else None)  # a step, or a fold
    if state.is_main_process:
        figures.adapter_sha256 = save_adapter(out["model"], out["tokenizer"], root / ADAPTER_DIR, out["format"])
        _write_history(root / TRAIN_LOG, out["history"])
        atomic_write(root / TRAIN_METRICS, figures.to_json() + "\n")
        shutil.rmtree(work_dir, ignore_errors=True)  # finished: nothing to resume, and no optimizer state left on disk
    state.wait_for_everyone()
    return figures
