"""A synthetic, joinable KuaiSearch world in the real schema, with a learnable signal.

``synthesize(out_dir, num_users=..., num_items=..., num_sessions=..., seed=...)`` writes
``users.jsonl items.jsonl recall.jsonl rank.jsonl relevance.jsonl`` (the demo names, the exact
field names and types of the real files), deterministically from ``seed``.

The generative story (every id written is one that exists):

- **Items**: a three-level category tree (level 3 is ``UNKNOWN``/0 for some leaves, as in the real
  data); each leaf has product nouns, each level-1 category an attribute vocabulary (colour,
  material, style, season...) and brands (Chinese names plus some latin ones), and there is the
  catch-all brand ``无品牌``. A title is ``[brand] [marketing word] attributes noun``, concatenated
  as Chinese titles are. Each item also has a latent popularity and quality and a price.
- **Users**: gender, age bucket, a frequent city, and preferences over level-1 categories that
  depend on gender and age; an activity level and a click bias.
- **Sessions** (in time order; the last ``test_fraction`` of them are the ``test`` split): a user
  picks an *intent item* from a preferred category and types a query made of its noun, some of its
  attributes and sometimes its brand. The engine impresses items of the same leaf ranked by word
  overlap, some of the same level-1 category, and random ones. Clicks follow a logistic model of
  query-title overlap, user-category preference (visible through the 20-item click history),
  item quality (visible through the item statistics), price and entrance; purchases are a sparser
  logistic model on clicks.
- **Rank** rows: one per impressed item with the user's 20 most recent clicked / purchased items
  before the session, fan / follow counts, 30-day user and item statistics (drawn from the same
  latent biases as the labels), price and entrance.
- **Relevance** pairs: session queries paired with the intent item, same-leaf, same-category and
  random items, graded 0-3 by noun / attribute / brand agreement (plus 5% label noise).
- **Keywords** (``keywords.jsonl``, OneSearch-V2's keyword reasoning): for each distinct query, the words
  that built it (brand, attributes, noun) followed by the noun's category path (level-1, level-2 and
  level-3 names): what an LLM with world knowledge would write for the query, a function of the query.

So a dual encoder beats popularity on recall, a ranking model beats a constant on AUC and a
cross-encoder beats the majority grade on relevance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------- vocabularies
# (level1, attributes, brands, [(level2, [(level3 or None, [nouns])])])
_TREE: Sequence[tuple[str, list[str], list[str], list[tuple[str, list[tuple[str | None, list[str]]]]]]] = (
    ("女装",
     ["修身", "显瘦", "韩版", "复古", "法式", "宽松", "纯棉", "真丝", "雪纺", "碎花", "黑色", "白色",
      "红色", "夏季", "秋冬", "加厚", "高腰", "长款", "短款", "气质"],
     ["香榭丽舍", "金粟兰", "芈姐家", "ZARVA", "Mellow"],
     [("裙装", [("连衣裙", ["连衣裙", "长裙"]), ("半身裙", ["半身裙", "百褶裙"])]),
      ("上衣", [("T恤", ["T恤", "短袖"]), ("衬衫", ["衬衫"]), ("毛衣", ["毛衣", "针织衫"])]),
      ("皮草", [(None, ["大衣", "皮草外套"])])]),
    ("男装",
     ["商务", "休闲", "加绒", "宽松", "直筒", "修身", "黑色", "藏青", "冬季", "春秋", "弹力", "工装",
      "纯棉", "男士", "潮牌"],
     ["雅鹿", "森马风", "HOLTEX", "Urbano"],
     [("外套", [("夹克", ["夹克"]), ("羽绒服", ["羽绒服"])]),
      ("裤子", [("休闲裤", ["休闲裤"]), ("牛仔裤", ["牛仔裤"])])]),
    ("鞋靴",
     ["透气", "防滑", "轻便", "软底", "网面", "真皮", "减震", "白色", "黑色", "女式", "男式", "夏季",
      "平底", "增高"],
     ["GUARCI", "三莎", "飞步", "Kavo", "RUNFLEX"],
     [("运动鞋", [("跑步鞋", ["跑步鞋", "跑鞋"]), ("篮球鞋", ["篮球鞋"])]),
      ("女鞋", [("高跟鞋", ["高跟鞋"]), ("舞蹈鞋", ["舞蹈鞋", "广场舞鞋"])])]),
    ("美妆护肤",
     ["补水", "保湿", "美白", "控油", "滋润", "哑光", "持久", "敏感肌", "提亮", "修护", "清爽", "学生"],
     ["水之蔻", "兰芝雅", "LUMIA", "DERMIQ"],
     [("护肤", [("面霜", ["面霜"]), ("精华", ["精华液"]), ("面膜", ["面膜"])]),
      ("彩妆", [("口红", ["口红"]), ("粉底", ["粉底液"])])]),
    ("手机数码",
     ["快充", "无线", "降噪", "防摔", "透明", "超长续航", "typec", "苹果", "安卓", "硅胶", "磁吸",
      "迷你"],
     ["绿联达", "VOLTA", "品胜通", "Ankor"],
     [("手机配件", [("数据线", ["数据线"]), ("充电器", ["充电器", "快充头"]), ("手机壳", ["手机壳"])]),
      ("耳机", [(None, ["蓝牙耳机", "耳机"])])]),
    ("家纺",
     ["纯棉", "加厚", "全棉", "水洗", "防滑", "免洗", "冬季", "夏凉", "北欧", "卡通", "简约", "大尺寸"],
     ["罗莱思", "爱家家居", "NORDIK"],
     [("床品", [("四件套", ["四件套"]), ("被子", ["被子", "棉被"])]),
      ("地毯地垫", [("地毯", ["地毯"]), ("地垫", ["地垫"])])]),
    ("食品饮料",
     ["原味", "无糖", "低脂", "散装", "礼盒", "新货", "特级", "独立包装", "罐装", "500g", "网红",
      "整箱"],
     ["三只熊", "良品坊", "NUTSY"],
     [("零食", [("坚果", ["坚果", "每日坚果"]), ("饼干", ["饼干"])]),
      ("茶饮", [("绿茶", ["绿茶"]), ("红茶", ["红茶"])])]),
    ("母婴",
     ["新生儿", "宽口径", "防胀气", "纯棉", "超薄", "透气", "男童", "女童", "加厚", "a类", "婴儿",
      "宝宝"],
     ["贝亲宝", "好孩子乐", "BABYLUX"],
     [("童装", [("儿童外套", ["儿童外套"]), ("婴儿连体衣", ["连体衣", "哈衣"])]),
      ("喂养", [("奶瓶", ["奶瓶"]), ("纸尿裤", ["纸尿裤", "尿不湿"])])]),
    ("运动户外",
     ["加厚", "防滑", "防水", "便携", "家用", "专业", "双人", "轻量", "大容量", "初学者", "户外",
      "折叠"],
     ["迪卡侬尼", "KEEPFIT", "牧高迪"],
     [("健身", [("瑜伽垫", ["瑜伽垫"]), ("哑铃", ["哑铃"])]),
      ("户外", [("帐篷", ["帐篷"]), ("登山包", ["登山包", "背包"])])]),
    ("珠宝饰品",
     ["淡水珍珠", "天然", "足金", "925银", "简约", "气质", "时尚", "高级感", "ins风", "送女友",
      "小众", "轻奢"],
     ["周大生福", "珍珠坊", "LUMIERE"],
     [("项链", [("珍珠项链", ["珍珠项链"]), ("金项链", ["金项链"])]),
      ("手链", [(None, ["手链", "手串"])])]),
)
_MARKETING = ("新款", "正品", "官方", "2025新款", "爆款", "热卖", "包邮", "高品质", "特价", "现货")
_NO_BRAND = "无品牌"
_SHOP_SUFFIX = ("官方旗舰店", "专营店", "旗舰店", "精品店")
_GENERIC_SHOP = ("优品", "生活馆", "小铺", "工厂店", "严选", "百货")
_GENDERS = ("F", "M")
_AGE_BUCKETS = ("0-11", "12-17", "18-23", "24-30", "31-40", "41-49", "50+")
_AGE_P = (0.01, 0.12, 0.16, 0.18, 0.25, 0.16, 0.12)
_PLACES = (
    ("山东", ("济南", "青岛", "聊城", "潍坊")), ("辽宁", ("沈阳", "大连", "鞍山")),
    ("广东", ("广州", "深圳", "佛山", "东莞")), ("河北", ("石家庄", "保定", "唐山")),
    ("浙江", ("杭州", "宁波", "温州")), ("江苏", ("南京", "苏州", "连云港")),
    ("黑龙江", ("哈尔滨", "齐齐哈尔")), ("吉林", ("长春", "松原")), ("四川", ("成都", "绵阳")),
    ("湖南", ("长沙", "株洲")), ("河南", ("郑州", "漯河", "洛阳")), ("陕西", ("西安", "延安")),
    ("内蒙古", ("呼和浩特", "通辽")), ("天津", ("天津",)), ("北京", ("北京",)), ("上海", ("上海",)),
)
# level-1 affinity by gender (F, M); indexes follow _TREE
_GENDER_AFFINITY = np.array([
    [3.0, 0.3], [0.4, 3.0], [1.2, 1.5], [2.5, 0.3], [0.8, 2.2],
    [1.2, 0.8], [1.0, 1.2], [1.6, 0.6], [0.7, 1.6], [1.5, 0.4]])
_ENTRANCES = ("mall", "homepage")
_ENTRANCE_P = (0.75, 0.25)
_HISTORY_LEN = 20
KEYWORDS_FILE = "keywords.jsonl"   # {"query": str, "keywords": [str, ...]} per distinct query (OneSearch-V2)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass
class _Catalog:
    """Items as parallel arrays plus the strings needed to write them."""

    leaf: np.ndarray  # leaf index
    l1: np.ndarray
    l2: np.ndarray
    brand: np.ndarray  # global brand index (0 = 无品牌)
    seller: np.ndarray  # global seller index
    attr_mask: np.ndarray  # int64 bitmask over the level-1 attribute pool
    noun: np.ndarray  # index into the leaf's nouns used in the title
    pop: np.ndarray  # sampling weight
    quality: np.ndarray
    price: np.ndarray  # in fen (1/100 yuan), as float
    title: list[str]
    attrs: list[list[str]]


def _build_taxonomy():
    leaves = []  # (l1, l2, l3name|None, nouns)
    l2_names = []  # (l1, name)
    for i1, (_, _, _, l2s) in enumerate(_TREE):
        for name2, l3s in l2s:
            l2_names.append((i1, name2))
            i2 = len(l2_names) - 1
            for name3, nouns in l3s:
                leaves.append((i1, i2, name3, nouns))
    brands = [(_NO_BRAND, -1)]  # (name, level1 or -1)
    for i1, (_, _, bs, _) in enumerate(_TREE):
        for b in bs:
            brands.append((b, i1))
    return leaves, l2_names, brands


def _build_sellers(rng, brands, num_generic: int):
    """Sellers: 1-2 shops per brand and generic shops for unbranded items."""
    sellers = []  # (name, brand index or 0)
    for bi, (bname, _) in enumerate(brands):
        if bi == 0:
            continue
        for k in range(1 + int(rng.random() < 0.5)):
            sellers.append((bname + _SHOP_SUFFIX[(bi + k) % len(_SHOP_SUFFIX)], bi))
    cities = [c for _, cs in _PLACES for c in cs]
    for g in range(num_generic):
        sellers.append((cities[g % len(cities)] + _GENERIC_SHOP[(g // len(cities)) % len(_GENERIC_SHOP)]
                        + str(g // (len(cities) * len(_GENERIC_SHOP)) or ""), 0))
    return sellers


def _make_items(rng, num_items: int, leaves, brands, sellers) -> _Catalog:
    n_leaves = len(leaves)
    leaf_w = rng.gamma(2.0, 1.0, size=n_leaves)
    leaf = rng.choice(n_leaves, size=num_items, p=leaf_w / leaf_w.sum())
    # make sure every leaf exists when there is room (keeps small worlds covering the tree)
    if num_items >= n_leaves:
        leaf[:n_leaves] = rng.permutation(n_leaves)
    l1 = np.array([leaves[x][0] for x in leaf], dtype=np.int64)
    l2 = np.array([leaves[x][1] for x in leaf], dtype=np.int64)
    brands_by_l1 = [[bi for bi, (_, c) in enumerate(brands) if c == i1] for i1 in range(len(_TREE))]
    sellers_by_brand: dict[int, list[int]] = {}
    for si, (_, bi) in enumerate(sellers):
        sellers_by_brand.setdefault(bi, []).append(si)
    brand = np.zeros(num_items, dtype=np.int64)
    seller = np.zeros(num_items, dtype=np.int64)
    attr_mask = np.zeros(num_items, dtype=np.int64)
    noun = np.zeros(num_items, dtype=np.int64)
    quality = rng.normal(0.0, 1.0, size=num_items)
    pop = np.exp(rng.normal(0.0, 1.0, size=num_items) + 0.5 * quality)
    leaf_price = np.exp(rng.uniform(np.log(20), np.log(600), size=n_leaves))
    price_yuan = leaf_price[leaf] * np.exp(rng.normal(0.0, 0.35, size=num_items))
    titles, attrs_all = [], []
    for i in range(num_items):
        i1 = l1[i]
        pool = _TREE[i1][1]
        nouns = leaves[leaf[i]][3]
        if rng.random() < 0.7:
            brand[i] = brands_by_l1[i1][rng.integers(len(brands_by_l1[i1]))]
            price_yuan[i] *= 1.4
        shops = sellers_by_brand.get(int(brand[i]), sellers_by_brand[0])
        seller[i] = shops[rng.integers(len(shops))]
        k = int(rng.integers(3, 6))
        chosen = np.sort(rng.choice(len(pool), size=k, replace=False))
        attr_mask[i] = int(sum(1 << int(a) for a in chosen))
        attrs = [pool[a] for a in chosen]
        noun[i] = rng.integers(len(nouns))
        in_title = [attrs[j] for j in rng.permutation(k)[: int(rng.integers(2, k + 1))]]
        parts = []
        if brand[i] != 0:
            b = brands[brand[i]][0]
            parts.append(f"【{b}】" if rng.random() < 0.2 else b)
        if rng.random() < 0.5:
            parts.append(_MARKETING[rng.integers(len(_MARKETING))])
        parts.extend(in_title)
        parts.append(nouns[noun[i]])
        if len(nouns) > 1 and rng.random() < 0.3:
            parts.append(nouns[1 - noun[i]] if len(nouns) == 2 else nouns[0])
        titles.append("".join(parts))
        attrs_all.append(attrs)
    price = np.round(price_yuan * 10.0) * 10.0  # fen, multiples of 10 (e.g. 5990.0)
    return _Catalog(leaf=leaf, l1=l1, l2=l2, brand=brand, seller=seller, attr_mask=attr_mask,
                    noun=noun, pop=pop, quality=quality, price=price, title=titles, attrs=attrs_all)


def _dump(f, row: dict) -> None:
    f.write(json.dumps(row, ensure_ascii=False))
    f.write("\n")


def synthesize(
    out_dir: str | os.PathLike,
    *,
    num_users: int = 1000,
    num_items: int = 5000,
    num_sessions: int = 10000,
    seed: int = 0,
    impressions_per_session: tuple[int, int] = (12, 24),
    num_relevance: int | None = None,
    test_fraction: float = 0.2,
) -> dict[str, pathlib.Path]:
    """Writes a synthetic KuaiSearch world; returns ``{kind: path}`` of the five JSONL files (``KEYWORDS_FILE``,
    the queries' keywords, is written beside them).

    Args:
      out_dir: folder to write ``users.jsonl items.jsonl recall.jsonl rank.jsonl relevance.jsonl``.
      num_users, num_items, num_sessions: world size (rank has one row per impression, so about
        ``num_sessions * mean(impressions_per_session)`` rows).
      seed: everything is a function of it (same seed -> identical bytes).
      impressions_per_session: inclusive (min, max) impressions of one session.
      num_relevance: relevance pairs (default: ``num_sessions``).
      test_fraction: the latest sessions (by time) that form the ``test`` split.
    """
    if num_users < 1 or num_items < 2 or num_sessions < 1:
        raise ValueError("need num_users >= 1, num_items >= 2 and num_sessions >= 1")
    lo, hi = impressions_per_session
    if not 1 <= lo <= hi:
        raise ValueError(f"impressions_per_session must be 1 <= min <= max, got {impressions_per_session}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    num_relevance = num_sessions if num_relevance is None else num_relevance
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence(seed))

    leaves, l2_names, brands = _build_taxonomy()
    sellers = _build_sellers(rng, brands, num_generic=max(8, num_items // 40))
    cat = _make_items(rng, num_items, leaves, brands, sellers)
    item_ids = np.arange(1, num_items + 1)  # item i -> id i + 1
    n_l1 = len(_TREE)
    items_by_leaf = [np.flatnonzero(cat.leaf == x) for x in range(len(leaves))]
    items_by_l1 = [np.flatnonzero(cat.l1 == x) for x in range(n_l1)]
    global_p = cat.pop / cat.pop.sum()
    price_z = (np.log(cat.price + 1.0) - np.log(cat.price + 1.0).mean()) / (np.log(cat.price + 1.0).std() + 1e-9)

    # ---- items
    paths = {k: out / f"{k}.jsonl" for k in ("users", "items", "recall", "rank", "relevance")}
    l1_ids = {i1: i1 + 1 for i1 in range(n_l1)}
    l3_ids: dict[int, int] = {}
    for li, (_, _, name3, _) in enumerate(leaves):
        if name3 is not None:
            l3_ids[li] = len(l3_ids) + 1
    with open(paths["items"], "w", encoding="utf-8") as f:
        for i in range(num_items):
            li = int(cat.leaf[i])
            i1, i2, name3, _ = leaves[li]
            _dump(f, {
                "item_id": int(item_ids[i]),
                "item_title": cat.title[i],
                "brand_id": int(cat.brand[i]) + 1,
                "brand_name": brands[cat.brand[i]][0],
                "seller_id": int(cat.seller[i]) + 1,
                "seller_name": sellers[cat.seller[i]][0],
                "category_level1_id": l1_ids[i1],
                "category_level1_name": _TREE[i1][0],
                "category_level2_id": i2 + 1,
                "category_level2_name": l2_names[i2][1],
                "category_level3_id": l3_ids.get(li, 0),
                "category_level3_name": name3 if name3 is not None else "UNKNOWN",
            })

    # ---- users
    gender = rng.choice(2, size=num_users, p=(0.6, 0.4))
    age = rng.choice(len(_AGE_BUCKETS), size=num_users, p=_AGE_P)
    pref = np.empty((num_users, n_l1))
    for u in range(num_users):
        base = _GENDER_AFFINITY[:, gender[u]].copy()
        if age[u] >= 5:  # 41+: home textiles, food
            base[[5, 6]] *= 2.0
        if 3 <= age[u] <= 4:  # 24-40: baby products
            base[7] *= 1.8
        pref[u] = rng.dirichlet(0.6 * base)
    activity = np.exp(rng.normal(0.0, 0.8, size=num_users))
    user_bias = rng.normal(0.0, 0.5, size=num_users)
    fan = np.floor(np.exp(rng.normal(2.5, 1.5, size=num_users))).astype(np.int64)
    follow = np.floor(np.exp(rng.normal(3.5, 1.2, size=num_users))).astype(np.int64)
    with open(paths["users"], "w", encoding="utf-8") as f:
        for u in range(num_users):
            prov, cities = _PLACES[rng.integers(len(_PLACES))]
            _dump(f, {
                "user_id": u + 1,
                "gender": _GENDERS[gender[u]],
                "age_bucket": _AGE_BUCKETS[age[u]],
                "fre_country": "中国",
                "fre_province": prov,
                "fre_city": cities[rng.integers(len(cities))],
            })

    # ---- 30-day statistics (fixed per user / item, drawn from the same latents as the labels)
    u_show = rng.poisson(200.0 * activity).astype(np.float64)
    u_click = rng.binomial(u_show.astype(np.int64), _sigmoid(-2.3 + user_bias)).astype(np.float64)
    u_order = rng.binomial(u_click.astype(np.int64), 0.12).astype(np.float64)
    u_gmv = np.round(u_order * np.exp(rng.normal(np.log(8000.0), 0.5, size=num_users)), 1)
    i_show = rng.poisson(300.0 * cat.pop).astype(np.float64)
    i_show[rng.random(num_items) < 0.1] = 0.0  # cold items
    i_click = rng.binomial(i_show.astype(np.int64), _sigmoid(-2.6 + 0.6 * cat.quality)).astype(np.float64)
    i_order = rng.binomial(i_click.astype(np.int64), _sigmoid(-2.2 + 0.6 * cat.quality)).astype(np.float64)
    item_stats_json = [json.dumps({
        "item_show_cnt_30d_hist": float(i_show[x]),
        "item_click_cnt_30d_hist": float(i_click[x]),
        "item_order_cnt_30d_hist": float(i_order[x]),
    }) for x in range(num_items)]

    # ---- per-user histories, seeded from preferences
    def sample_pref_items(u: int, n: int) -> list[int]:
        cats = rng.choice(n_l1, size=n, p=pref[u])
        out_ids = []
        for c in cats:
            pool = items_by_l1[c]
            if len(pool) == 0:
                pool = np.arange(num_items)
            w = cat.pop[pool]
            out_ids.append(int(pool[rng.choice(len(pool), p=w / w.sum())]) + 1)  # ids
        return out_ids

    clicked_hist = [sample_pref_items(u, _HISTORY_LEN) for u in range(num_users)]
    bought_hist = [list(rng.choice(h, size=_HISTORY_LEN)) for h in clicked_hist]

    # ---- sessions
    times = np.sort(rng.choice(500_000, size=num_sessions, replace=num_sessions > 500_000))
    n_test = int(round(num_sessions * test_fraction))
    session_user = rng.choice(num_users, size=num_sessions, p=activity / activity.sum())
    sessions = []  # kept for relevance: (leaf, attr_mask, brand or -1, query, intent item)
    keyword_queries: set[str] = set()
    with open(paths["recall"], "w", encoding="utf-8") as frec, \
            open(paths["rank"], "w", encoding="utf-8") as frank, \
            open(out / KEYWORDS_FILE, "w", encoding="utf-8") as fkw:
        for s in range(num_sessions):
            u = int(session_user[s])
            split = "test" if s >= num_sessions - n_test else "train"
            # intent
            c1 = int(rng.choice(n_l1, p=pref[u])) if rng.random() < 0.85 else int(rng.integers(n_l1))
            pool = items_by_l1[c1]
            if len(pool) == 0:
                pool = np.arange(num_items)
            w = cat.pop[pool]
            intent = int(pool[rng.choice(len(pool), p=w / w.sum())])
            li = int(cat.leaf[intent])
            nouns = leaves[li][3]
            attr_bits = [b for b in range(63) if cat.attr_mask[intent] >> b & 1]
            n_q = int(rng.choice(3, p=(0.25, 0.45, 0.30)))
            q_bits = sorted(int(b) for b in rng.choice(attr_bits, size=min(n_q, len(attr_bits)), replace=False))
            q_mask = sum(1 << b for b in q_bits)
            q_brand = int(cat.brand[intent]) if (cat.brand[intent] != 0 and rng.random() < 0.2) else -1
            pool_words = _TREE[cat.l1[intent]][1]
            words = [pool_words[b] for b in q_bits]
            rng.shuffle(words)
            q_noun = nouns[int(cat.noun[intent])] if rng.random() < 0.8 else nouns[int(rng.integers(len(nouns)))]
            query = ("".join(words) + q_noun) if q_brand < 0 else (brands[q_brand][0] + "".join(words) + q_noun)
            sessions.append((li, q_mask, q_brand, query, intent, len(q_bits)))
            if query not in keyword_queries:   # no draw from rng: the other files are unchanged
                keyword_queries.add(query)
                path = [_TREE[cat.l1[intent]][0], l2_names[leaves[li][1]][1], leaves[li][2]]
                _dump(fkw, {"query": query, "keywords": ([brands[q_brand][0]] if q_brand >= 0 else []) + words
                            + [q_noun] + [p for p in path if p is not None]})

            # impressions: same leaf ranked by overlap, some same level-1, some random
            n_imp = int(rng.integers(lo, hi + 1))
            leaf_pool = items_by_leaf[li]
            overlap = np.bitwise_count(cat.attr_mask[leaf_pool] & q_mask).astype(np.float64)
            bscore = 0.0 if q_brand < 0 else 1.5 * (cat.brand[leaf_pool] == q_brand)
            engine = overlap + bscore + 0.3 * np.log(cat.pop[leaf_pool]) + rng.gumbel(size=len(leaf_pool))
            n_rel = min(len(leaf_pool), max(1, int(round(n_imp * 0.55))))
            chosen = list(leaf_pool[np.argsort(-engine, kind="stable")[:n_rel]])
            if intent not in chosen and rng.random() < 0.85:
                chosen[-1] = intent
            seen = set(int(x) for x in chosen)
            n_cat = int(round(n_imp * 0.2))
            l1_pool = items_by_l1[c1]
            for x in rng.choice(l1_pool, size=min(n_cat, len(l1_pool)), replace=False):
                if len(chosen) < n_imp and int(x) not in seen:
                    chosen.append(int(x))
                    seen.add(int(x))
            tries = 0
            while len(chosen) < n_imp and tries < 4 * n_imp:
                x = int(rng.choice(num_items, p=global_p))
                tries += 1
                if x not in seen:
                    chosen.append(x)
                    seen.add(x)
            imp = np.array(chosen, dtype=np.int64)
            rng.shuffle(imp)
            # engine order: noisy relevance
            imp_leaf = cat.leaf[imp] == li
            imp_overlap = np.bitwise_count(cat.attr_mask[imp] & q_mask) * imp_leaf
            attr_frac = imp_overlap / max(1, len(q_bits)) if q_bits else imp_leaf.astype(np.float64)
            brand_term = np.zeros(len(imp)) if q_brand < 0 else np.where(cat.brand[imp] == q_brand, 1.0, -0.8)
            order = np.argsort(-(2.0 * imp_leaf + attr_frac + rng.normal(0, 0.7, size=len(imp))), kind="stable")
            imp = imp[order]
            imp_leaf, attr_frac, brand_term = imp_leaf[order], attr_frac[order], brand_term[order]

            # clicks and purchases
            hist = clicked_hist[u]
            hist_l1 = np.bincount(cat.l1[np.array(hist) - 1], minlength=n_l1) / len(hist)
            hist_leaf = cat.leaf[np.array(hist) - 1]
            same_leaf_hist = np.array([(hist_leaf == cat.leaf[x]).mean() for x in imp])
            entrance = int(rng.choice(2, p=_ENTRANCE_P))
            logit = (-5.4 + 2.2 * imp_leaf + 1.6 * attr_frac + 1.2 * brand_term
                     + 2.0 * hist_l1[cat.l1[imp]] + 1.5 * same_leaf_hist
                     + 0.3 * np.log(pref[u][cat.l1[imp]] * n_l1 + 1e-3)
                     + 0.7 * cat.quality[imp] - 0.35 * price_z[imp] - 0.5 * entrance + user_bias[u])
            click = rng.random(len(imp)) < _sigmoid(logit)
            buy_logit = -3.2 + 0.7 * cat.quality[imp] - 0.5 * price_z[imp] + 0.8 * attr_frac + 0.5 * user_bias[u]
            buy = click & (rng.random(len(imp)) < _sigmoid(buy_logit))
            imp_ids = [int(x) + 1 for x in imp]
            clicked_ids = [imp_ids[j] for j in range(len(imp)) if click[j]]
            bought_ids = [imp_ids[j] for j in range(len(imp)) if buy[j]]
            _dump(frec, {
                "user_id": u + 1,
                "session_id": s + 1,
                "impressed_item_ids": imp_ids,
                "clicked_item_ids": clicked_ids,
                "purchased_item_ids": bought_ids,
                "time_index": int(times[s]),
                "query": query,
                "split": split,
            })
            ustats = {
                "user_show_cnt_30d_hist": float(u_show[u]),
                "user_click_cnt_30d_hist": float(u_click[u]),
                "user_order_cnt_30d_hist": float(u_order[u]),
                "user_gmv_30d_hist": float(u_gmv[u]),
            }
            recent_c = [int(x) for x in hist[-_HISTORY_LEN:]][::-1]
            recent_b = [int(x) for x in bought_hist[u][-_HISTORY_LEN:]][::-1]
            # Rank rows share everything but the target: dump the shared parts once
            # (byte-identical to json.dumps of the whole row, in schema key order).
            head = json.dumps({
                "user_id": u + 1,
                "session_id": s + 1,
                "user_fan_number": int(fan[u]),
                "user_follow_number": int(follow[u]),
                "time_index": int(times[s]),
                "search_entrance": _ENTRANCES[entrance],
                "recently_clicked_item_ids": recent_c,
                "recently_purchased_item_ids": recent_b,
                "query": query,
            }, ensure_ascii=False)[:-1]
            mid = f', "user_statistical_features": {json.dumps(ustats)}, "target_item_statistical_features": '
            tail = f', "split": {json.dumps(split)}}}\n'
            for j, x in enumerate(imp):
                frank.write(
                    f'{head}, "target_item_id": {imp_ids[j]}, '
                    f'"target_item_price": {float(cat.price[x])!r}, "is_clicked": {int(click[j])}, '
                    f'"is_purchased": {int(buy[j])}{mid}{item_stats_json[x]}{tail}')
            # histories move on (ids, most recent last)
            if clicked_ids:
                clicked_hist[u] = (hist + clicked_ids)[-_HISTORY_LEN:]
            if bought_ids:
                bought_hist[u] = (list(bought_hist[u]) + bought_ids)[-_HISTORY_LEN:]

    # ---- relevance pairs
    with open(paths["relevance"], "w", encoding="utf-8") as f:
        for _ in range(num_relevance):
            li, q_mask, q_brand, query, intent, n_qattr = sessions[int(rng.integers(len(sessions)))]
            r = rng.random()
            if r < 0.3:
                x = intent
            elif r < 0.6 and len(items_by_leaf[li]) > 0:
                x = int(rng.choice(items_by_leaf[li]))
            elif r < 0.8:
                pool = items_by_l1[int(cat.l1[intent])]
                x = int(rng.choice(pool))
            else:
                x = int(rng.integers(num_items))
            score = _relevance_grade(cat, leaves, li, q_mask, q_brand, n_qattr, intent, x)
            if rng.random() < 0.05:
                score = int(np.clip(score + rng.choice((-1, 1)), 0, 3))
            _dump(f, {
                "query": query,
                "item_title": cat.title[x],
                "brand": brands[cat.brand[x]][0],
                "seller_name": sellers[cat.seller[x]][0],
                "attr_value": ",".join(cat.attrs[x] + [brands[cat.brand[x]][0]]),
                "score": score,
            })
    return paths


def _relevance_grade(cat: _Catalog, leaves, li: int, q_mask: int, q_brand: int, n_qattr: int,
                     intent: int, x: int) -> int:
    """0-3: 3 = right product with every asked attribute (and brand), 2 = right product with half
    of them, 1 = right product otherwise or a sibling category, 0 = unrelated."""
    brand_ok = q_brand < 0 or int(cat.brand[x]) == q_brand
    if int(cat.leaf[x]) == li:
        frac = 1.0 if n_qattr == 0 else int(np.bitwise_count(np.int64(cat.attr_mask[x] & q_mask))) / n_qattr
        return 1 + int(frac >= 0.5 and brand_ok) + int(frac == 1.0 and brand_ok)
    if int(cat.l2[x]) == int(cat.l2[intent]):
        return 1
    if int(cat.l1[x]) == int(cat.l1[intent]) and (int(cat.attr_mask[x]) & q_mask):
        return 1
    return 0
