"""Search-agent data: answer metrics, the QA / passage readers, the synthetic world, the retriever tool."""

import collections
import json

import pytest

from data_pipelines.agents import synthetic
from data_pipelines.agents.corpus import CorpusFormatError, passage_text, read_passages, split_contents
from data_pipelines.agents.metrics import exact_match, f1, normalize_answer
from data_pipelines.agents.qa import QAFormatError, read_qa
from data_pipelines.agents.records import ReadStats
from data_pipelines.jsonl_convert import TooManyBadLinesError
from launch.cli import main
from trainers.evaluators.passage_retriever import PassageIndexError, PassageRetriever, build_passage_index

pytestmark = pytest.mark.xdist_group("agents_data")


def _lines(path, *objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  the   Eiffel-Tower! ", "eiffeltower"),          # punctuation removed inside words, not split on
    ("U.S.A.", "usa"),
    ("A banana and an apple", "banana and apple"),      # articles as whole words only
    ("Theater of the Absurd", "theater of absurd"),     # "the" inside a word stays
    ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),
    ("1,000", "1000"),
    ("the", ""),
])
def test_normalize_answer_squad_cases(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0                     # one gold as a string
    assert exact_match("Paris", []) == 0.0 and f1("Paris", []) == 0.0
    assert f1("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)   # P=1, R=1/2
    assert f1("cat cat", ["cat"]) == pytest.approx(2 / 3)           # P=1/2 (counts clipped), R=1
    assert f1("dog", ["cat", "a dog"]) == 1.0                       # max over golds
    assert f1("", ["cat"]) == 0.0 and f1("the", ["a"]) == 0.0       # nothing left after normalising
    assert f1("New York City", ["new york"]) == pytest.approx(0.8)  # P=2/3, R=1


# ----------------------------------------------------------------------------- QA reader


def test_read_qa_flashrag_lines_and_aliases(tmp_path):
    f = _lines(tmp_path / "nq.jsonl",
               {"id": "test_0", "question": "who got the first nobel prize in physics?",
                "golden_answers": ["Wilhelm Conrad Röntgen"], "metadata": {"source": "nq"}},
               "",
               {"_id": "5a8b", "question": "q2", "answer": "yes"},                  # HotpotQA raw
               {"question": "q3", "answers": ["x", "x", "y"]})                      # no id: the line number
    qa = read_qa(f)
    assert [r.id for r in qa] == ["test_0", "5a8b", "4"]
    assert qa[0].golden_answers == ("Wilhelm Conrad Röntgen",) and qa[0].metadata == {"metadata": {"source": "nq"}}
    assert qa[1].golden_answers == ("yes",) and qa[2].golden_answers == ("x", "y")
    assert qa[0].hops is None and qa[0].supporting_passages == ()


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"id": 1, "golden_answers": ["a"]}, "missing field 'question'"),
    ({"id": 1, "question": "q"}, "no golden answers"),
    ({"id": 1, "question": "q", "golden_answers": [1]}, "must be a string or a list of strings"),
    ({"id": 1, "question": "q", "golden_answers": ["", " "]}, "no non-empty answer"),
    ({"id": 1, "question": "q", "golden_answers": ["a"], "hops": 0}, "'hops' must be an integer >= 1"),
    ({"id": 0, "question": "q", "golden_answers": ["a"]}, "repeats the one at"),
])
def test_read_qa_bad_line_names_file_and_line(tmp_path, line, reason):
    f = _lines(tmp_path / "qa.jsonl", {"id": 0, "question": "ok", "golden_answers": ["a"]}, line)
    with pytest.raises(QAFormatError, match=reason) as e:
        read_qa(f)
    assert f"{f}:2: " in str(e.value)


def test_read_qa_max_bad_fraction_skips_and_caps(tmp_path):
    good = [{"id": i, "question": f"q{i}", "golden_answers": ["a"]} for i in range(9)]
    f = _lines(tmp_path / "qa.jsonl", *good, "{bad")
    stats = ReadStats()
    assert len(read_qa(f, max_bad_fraction=0.2, stats=stats)) == 9
    assert (stats.kept, stats.skipped) == (9, 1) and f"{f}:10:" in stats.bad[0]
    with pytest.raises(TooManyBadLinesError, match=r"1 bad line\(s\) of 10"):
        read_qa(f, max_bad_fraction=0.05)
    with pytest.raises(ValueError, match="max_bad_fraction must be in"):
        read_qa(f, max_bad_fraction=1.0)


# ----------------------------------------------------------------------------- corpus reader


def test_read_passages_wiki18_and_title_text(tmp_path):
    f = _lines(tmp_path / "wiki.jsonl",
               {"id": "0", "contents": '"Aaron"\nAaron is a prophet.\nSecond line.'},
               {"id": 1, "contents": "no title here"},
               {"id": "2", "title": "T", "text": " body "},
               {"id": "3", "text": "untitled"})
    ps = read_passages(f)
    assert [tuple(p) for p in ps] == [("0", "Aaron", "Aaron is a prophet.\nSecond line."),
                                      ("1", "", "no title here"), ("2", "T", "body"), ("3", "", "untitled")]
    assert split_contents('"Say "hi""\nx') == ('Say "hi"', "x")
    assert passage_text(ps[0]) == "Aaron\nAaron is a prophet.\nSecond line." and passage_text(ps[3]) == "untitled"


@pytest.mark.parametrize("line, reason", [
    ({"contents": '"T"\nx'}, "missing field 'id'"),
    ({"id": "9", "body": "x"}, "needs 'contents'"),
    ({"id": "9", "contents": '"T"\n  '}, "has no text"),
    ({"id": "9", "title": 3, "text": "x"}, "field 'title' must be a string"),
    ({"id": "0", "contents": '"T"\nx'}, "repeats the one at"),
])
def test_read_passages_bad_line_names_file_and_line(tmp_path, line, reason):
    f = _lines(tmp_path / "wiki.jsonl", {"id": "0", "contents": '"A"\nfine'}, line)
    with pytest.raises(CorpusFormatError, match=reason) as e:
        read_passages(f)
    assert f"{f}:2: " in str(e.value)


# ----------------------------------------------------------------------------- the synthetic world


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthetic.write_world(out / "w", seed=3)
    return out / "w"


def test_world_is_deterministic_from_its_seed(world_dir, tmp_path):
    synthetic.write_world(tmp_path / "again", seed=3)
    synthetic.write_world(tmp_path / "other", seed=4)
    for name in ("corpus.jsonl", "train.jsonl", "test.jsonl", "world.json"):
        assert (tmp_path / "again" / name).read_bytes() == (world_dir / name).read_bytes(), name
    assert (tmp_path / "other" / "corpus.jsonl").read_bytes() != (world_dir / "corpus.jsonl").read_bytes()


def test_world_chains_are_supported_by_their_passages(world_dir):
    passages = {p.id: p for p in read_passages(world_dir / "corpus.jsonl")}
    assert 550 <= len(passages) <= 650                              # the tiny default: ~600
    splits = {s: read_qa(world_dir / f"{s}.jsonl") for s in ("train", "test")}
    for split, qa in splits.items():
        hops = collections.Counter(q.hops for q in qa)
        assert set(hops) == {1, 2, 3} and min(hops.values()) >= 50, (split, hops)
        for q in qa:
            chain = q.metadata["chain"]
            assert len(q.supporting_passages) == q.hops == len(chain) - 1
            assert chain[0] in q.question and chain[-1] == q.golden_answers[0]
            for i, pid in enumerate(q.supporting_passages):
                p = passages[pid]                                   # every supporting passage exists
                assert p.title == chain[i] and chain[i + 1] in p.text, (q, p)
            assert q.golden_answers[0] in passages[q.supporting_passages[-1]].text
    assert not {q.question for q in splits["train"]} & {q.question for q in splits["test"]}


def test_cli_synth_corpus_search(tmp_path, capsys):
    assert main(["agents", "synth", "--out", str(tmp_path / "w"), "--seed", "1", "--entities", "40",
                 "--questions", "12"]) == 0
    assert "40 entities" in capsys.readouterr().out
    assert main(["agents", "corpus", "--passages", str(tmp_path / "w/corpus.jsonl"), "--encoder", "bm25",
                 "--out", str(tmp_path / "idx")]) == 0
    manifest = json.loads((tmp_path / "idx/manifest.json").read_text())
    assert manifest["index"] == "bm25" and manifest["passages"] == len(read_passages(tmp_path / "w/corpus.jsonl"))
    q = read_qa(tmp_path / "w/test.jsonl")[0]
    capsys.readouterr()
    assert main(["agents", "search", "--index", str(tmp_path / "idx"), "--query", q.question, "--k", "2"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["query"] == q.question and len(hit["passages"]) == 2
    assert set(hit["passages"][0]) == {"id", "title", "text", "score"}
    _lines(tmp_path / "bad.jsonl", {"id": "0", "text": "x"}, "{oops")
    assert main(["agents", "corpus", "--passages", str(tmp_path / "bad.jsonl"), "--encoder", "bm25",
                 "--out", str(tmp_path / "idx2")]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the retriever


def test_bm25_retriever_finds_the_first_supporting_passage(world_dir, tmp_path):
    m = build_passage_index(world_dir / "corpus.jsonl", tmp_path / "idx", "bm25", progress=False)
    assert m["encoder"]["kind"] == "bm25" and m["skipped_lines"] == 0
    r = PassageRetriever(tmp_path / "idx")
    qa = read_qa(world_dir / "test.jsonl")
    for hops in (1, 2, 3):
        group = [q for q in qa if q.hops == hops]
        results = r.search([q.question for q in group], k=3)
        assert all(len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"] for hits in results)
        recall = sum(q.supporting_passages[0] in {h["id"] for h in hits}
                     for q, hits in zip(group, results)) / len(group)
        assert recall >= 0.9, (hops, recall)                        # measured: 1.0 for every hop count
    assert r.search([], k=3) == []


def test_retriever_refuses_a_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(PassageIndexError, match="no manifest.json"):
        PassageRetriever(tmp_path)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from models.sentence_encoder import SentenceEncoder

    return SentenceEncoder(minilm_dir, max_len=48, batch_size=32)


def test_minilm_retriever_finds_a_passage_from_its_own_text(minilm, world_dir, tmp_path):
    passages = read_passages(world_dir / "corpus.jsonl")[:24]
    small = _lines(tmp_path / "small.jsonl", *({"id": p.id, "title": p.title, "text": p.text} for p in passages))
    m = build_passage_index(small, tmp_path / "idx", minilm, progress=False)
    assert m["index"] == "exact" and m["encoder"]["dim"] == 384 and m["encoder"]["max_len"] == 48
    r = PassageRetriever(tmp_path / "idx", encoder=minilm)
    results = r.search([passage_text(p) for p in passages], k=3)
    assert [hits[0]["id"] for hits in results] == [p.id for p in passages]
    assert results[0][0]["score"] == pytest.approx(1.0, abs=1e-4)
