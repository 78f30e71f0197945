"""Write the sample copywriting domain, ``data/raw/copy_briefs.csv`` (see configs/copy.yaml).

A department store's approved advertising lines: one brief (product, channel, selling point, event) per product
and target age group, each with two approved lines in the tone the store uses for that age (20대 casual, 30대 and
40대 polite, 50대 이상 formal). Written for loraops; rerun to regenerate it exactly (no randomness).

    python scripts/make_copy_briefs.py && dvc add data/raw/copy_briefs.csv
"""

from __future__ import annotations

import csv
from pathlib import Path

PRODUCTS = [  # name, selling point, event
    ("리넨 셔츠", "가볍고 시원한 착용감", "여름 신상 기획전"), ("캐시미어 머플러", "부드럽고 따뜻한 촉감", "겨울 선물 대전"),
    ("러닝화", "발이 편한 쿠셔닝", "스포츠 위크"), ("무선 이어폰", "선명한 음질", "디지털 페스타"),
    ("텀블러", "오래가는 보온", "친환경 주간"), ("한우 선물 세트", "엄선한 1등급 원육", "명절 선물전"),
    ("유기농 과일 바구니", "산지에서 바로 온 신선함", "제철 과일전"), ("실크 스카프", "은은한 광택", "봄맞이 잡화전"),
    ("가죽 토트백", "넉넉한 수납", "가방 기획전"), ("구스 이불", "포근한 보온력", "침구 대전"),
    ("홍삼 정과", "하루 한 번 건강 관리", "건강식품전"), ("커피 머신", "집에서 즐기는 카페 맛", "주방가전 페어"),
    ("트렌치코트", "클래식한 실루엣", "가을 아우터전"), ("선크림", "끈적임 없는 자외선 차단", "뷰티 위크"),
    ("향수", "오래 남는 잔향", "향수 팝업"), ("도자기 그릇 세트", "정갈한 식탁", "리빙 기획전"),
    ("아동 우비", "비 오는 날도 즐거운 등굣길", "키즈 페스타"), ("등산 재킷", "바람을 막는 방풍 기능", "아웃도어 대전"),
    ("안마 의자", "하루 피로를 푸는 휴식", "효도 선물전"), ("전통 한과", "정성 담은 손맛", "설 선물전"),
    ("스마트워치", "건강 기록 관리", "얼리버드 특가"), ("캠핑 의자", "어디서나 편한 휴식", "캠핑 페어"),
    ("니트 카디건", "간절기 데일리 아이템", "간절기 특가"), ("와인 세트", "특별한 날의 건배", "와인 장터"),
    ("요가 매트", "미끄럼 없는 그립감", "홈트 주간"), ("공기청정기", "깨끗한 실내 공기", "봄 가전전"),
    ("진주 귀걸이", "단아한 포인트", "주얼리 위크"), ("골프 장갑", "손에 감기는 착용감", "골프 대전"),
    ("전기 그릴", "연기 적은 실내 구이", "홈파티 기획전"), ("보온 도시락", "점심까지 따뜻한 한 끼", "새 학기 대전"),
    ("수제 초콜릿", "달콤한 마음 전하기", "밸런타인 기획전"), ("명품 만년필", "오래 쓰는 필기감", "입학 졸업 선물전"),
    ("린넨 원피스", "여름 나들이 스타일", "바캉스 기획전"), ("발마사지기", "집에서 받는 발 관리", "어버이날 선물전"),
    ("데님 재킷", "어디에나 어울리는 스타일", "데님 페어"), ("비타민 세트", "온 가족 영양 관리", "건강 주간"),
    ("여행 캐리어", "가벼운 여행길", "여행 준비전"), ("원목 식탁", "오래 쓰는 튼튼함", "가구 대전"),
    ("수분 크림", "하루 종일 촉촉함", "뷰티 페스타"), ("블루투스 스피커", "어디서나 풍성한 소리", "여름 음악 페스타"),
    ("양모 코트", "품격 있는 겨울 외출", "겨울 아우터전"), ("한방 화장품 세트", "깊이 있는 피부 관리", "뷰티 선물전"),
    ("아기 내의", "순면의 부드러움", "베이비 페어"), ("전기 자전거", "힘들지 않은 출퇴근", "모빌리티 위크"),
    ("찻잔 세트", "여유로운 티타임", "티 페스타"), ("보석 반지", "오래 간직할 약속", "웨딩 페어"),
    ("프리미엄 김 세트", "바삭한 식감", "추석 선물전"), ("손목 보호대", "편안한 손목 관리", "건강 용품전"),
]
CHANNELS = ["문자", "앱 푸시", "인스타그램", "매장 POP"]
AGES = ["20대", "30대", "40대", "50대 이상"]


def _batchim(word: str) -> int:
    """The final consonant index of the word's last Hangul syllable (0: none; 8: ㄹ); 0 for non-Hangul."""
    last = word[-1]
    return (ord(last) - 0xAC00) % 28 if "가" <= last <= "힣" else 0


def josa(word: str, with_final: str, without_final: str) -> str:
    """The particle that fits the word: 을/를, 이/가, 은/는, 과/와, 으로/로 (ㄹ takes 로)."""
    final = _batchim(word)
    if with_final == "으로":
        return word + ("으로" if final and final != 8 else "로")
    return word + (with_final if final else without_final)


TEMPLATES = {  # two approved lines per brief, in the tone of the age group
    "20대": [
        lambda n, b, e: f"{e} 시작! {josa(n, '으로', '로')} {b} 챙겨 가자.",
        lambda n, b, e: f"요즘 대세는 {n}! {b}, 지금 바로 득템해.",
        lambda n, b, e: f"{josa(b, '을', '를')} 찾는다면 {n}지. {e} 놓치지 마!",
        lambda n, b, e: f"{josa(n, '이', '가')} 왔어. {e}에서 제일 먼저 만나 봐.",
    ],
    "30대": [
        lambda n, b, e: f"{josa(e, '이', '가')} 시작됐어요. {josa(n, '으로', '로')} {b} 챙기세요.",
        lambda n, b, e: f"새로 나온 {n}, {josa(b, '이', '가')} 남달라요. 지금 만나 보세요.",
        lambda n, b, e: f"{josa(b, '을', '를')} 원하신다면 {josa(n, '을', '를')} 추천해요. {e} 놓치지 마세요.",
        lambda n, b, e: f"바쁜 하루에도 {b}. {josa(n, '이', '가')} 함께해요.",
    ],
    "40대": [
        lambda n, b, e: f"가족 모두 만족할 {n}, {e}에서 더 합리적으로 만나실 수 있어요.",
        lambda n, b, e: f"{josa(b, '이', '가')} 필요할 때 {josa(n, '을', '를')} 골라 보세요.",
        lambda n, b, e: f"믿을 수 있는 {josa(n, '으로', '로')} {josa(b, '을', '를')} 누리세요. {josa(e, '은', '는')} 이번 주까지예요.",
        lambda n, b, e: f"{e} 소식이에요. {n}의 {josa(b, '을', '를')} 직접 느껴 보세요.",
    ],
    "50대 이상": [
        lambda n, b, e: f"{josa(e, '을', '를')} 엽니다. {josa(n, '으로', '로')} {josa(b, '을', '를')} 누려 보십시오.",
        lambda n, b, e: f"오래 기다리신 {josa(n, '을', '를')} 소개해 드립니다. {josa(b, '을', '를')} 직접 확인하십시오.",
        lambda n, b, e: f"{josa(b, '을', '를')} 위한 선택, {josa(n, '을', '를')} {e}에서 만나 보시기 바랍니다.",
        lambda n, b, e: f"정성을 다해 {josa(n, '을', '를')} 준비했습니다. {e}에 모시겠습니다.",
    ],
}


def rows() -> list[dict[str, str]]:
    out = []
    for number, (name, benefit, event) in enumerate(PRODUCTS):
        channel = CHANNELS[number % len(CHANNELS)]
        for age in AGES:
            templates = TEMPLATES[age]
            brief = f"상품: {name} / 채널: {channel} / 강조점: {benefit} / 행사: {event}"
            for turn in range(2):
                line = templates[(number + turn) % len(templates)](name, benefit, event)
                out.append({"id": f"P{number:03d}", "brief": brief, "channel": channel, "target_age": age, "copy": line})
    return out


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "data/raw/copy_briefs.csv"
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "brief", "channel", "target_age", "copy"])
        writer.writeheader()
        writer.writerows(rows())
    print(f"wrote {target} ({len(PRODUCTS) * len(AGES)} briefs)")
