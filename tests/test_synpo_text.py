"""SynPO text processing: keywords and their sampling, the paper's templates, SFT data, <question> parsing,
the repetition measure."""

import random

import pyarrow.parquet as pq
import pytest

from selfalign_ray.synpo.corpus import (
    KeywordsConfig,
    build_corpus,
    sample_keyword_lists,
)
from selfalign_ray.synpo.filters import repetition_rate
from selfalign_ray.synpo.keywords import (
    INSTRUCTION_WORDS,
    STOPWORDS,
    extract_keywords,
    sample_keywords,
)
from selfalign_ray.synpo.parsing import parse_question
from selfalign_ray.synpo.seeds import Seed
from selfalign_ray.synpo.sft_data import generator_examples, improver_example, write_sft
from selfalign_ray.synpo.templates import (
    generator_prompt,
    generator_target,
    improver_prompt,
)

SEEDS = [
    Seed("a", "Explain how glaciers carve valleys and moraines in mountain ranges.", "Glaciers grind rock ..."),
    Seed("b", "Write a recipe for sourdough bread with a crisp crust.", "Mix starter, flour, water ..."),
    Seed("c", "Describe how batteries store electrical charge in lithium cells.", "Lithium ions move ..."),
    Seed("d", "Suggest a training plan for a beginner marathon runner.", "Week one: easy runs ..."),
    Seed("e", "Hi.", "Hello!"),  # no keyword candidates at all
]


# ------------------------------------------------------------------------------------------ keywords
def test_keywords_have_no_stopwords_short_words_or_digits():
    text = ("The reactor was cooled by water that they pumped through 3 pipes; each pipe was 20m long and "
            "the pipes had valves2 fitted. Engineers also checked the valves.")
    kws = extract_keywords(text)
    assert kws and not set(kws) & (STOPWORDS | INSTRUCTION_WORDS)
    assert all(len(w) >= 4 and w.isalpha() for w in kws)
    assert "pipe" in kws and "pipes" not in kws       # plural folded into the singular
    assert kws[0] == "pipe"                           # repeated words rank first
    assert "engineers" in kws and "reactor" in kws and "valves2" not in kws


def test_keywords_drop_names_but_keep_capitalised_sentence_openers():
    text = ("Volcanoes form where magma reaches the surface. The geologist Maria Sanchez studied Etna with NASA "
            "satellites. Marie Curie measured radiation. Lava cools into basalt.")
    kws = extract_keywords(text)
    for name in ("maria", "sanchez", "etna", "nasa", "marie", "curie"):
        assert name not in kws, name
    # Capitalised only because they open a sentence: common words, kept.
    assert "volcanoes" in kws and "lava" in kws
    assert {"magma", "satellites", "radiation", "basalt"} <= set(kws)


def test_instruction_verbs_are_not_keywords():
    kws = extract_keywords("Please write and explain a detailed summary of medieval castle architecture.")
    assert "write" not in kws and "explain" not in kws and "please" not in kws
    assert {"medieval", "castle", "architecture", "summary"} <= set(kws)


def test_sample_keywords_draws_distinct_words_from_the_top_candidates():
    cands = [f"word{c}" for c in "abcdefghijklmnop"]
    rng = random.Random(0)
    for _ in range(50):
        picked = sample_keywords(cands, 3, rng, top_k=5)
        assert len(set(picked)) == 3 and set(picked) <= set(cands[:5])
    assert sample_keywords(["alpha", "beta"], 3, rng, top_k=12) is None


def _corpus_file(tmp_path, n=30):
    topics = ["volcanic basalt magma eruptions", "orchard apples pruning blossoms", "telescope mirrors galaxies",
              "violin strings bowing rosin", "glacier moraines crevasses", "bakery sourdough ovens"]
    paras = [f"Paragraph {i} talks about {topics[i % len(topics)]} and the measurement of {topics[(i + 1) % len(topics)]}."
             for i in range(n)]
    paras.append("Too short.")  # below min_paragraph_chars
    paras.append("It is what it is and so on, as it was, and we are here.")  # no candidates (stopwords only)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n")
    return path


def test_keyword_lists_come_from_different_paragraphs_and_change_between_iterations(tmp_path):
    cfg = KeywordsConfig(path=str(_corpus_file(tmp_path)), include_seed_prompts=False)
    corpus = build_corpus(cfg, [])
    assert len(corpus.paragraphs) == 30 and corpus.too_few_keywords == 1
    it1 = sample_keyword_lists(corpus, 10, seed=0, iteration=1, cfg=cfg)
    it2 = sample_keyword_lists(corpus, 10, seed=0, iteration=2, cfg=cfg)
    assert len({k.source_id for k in it1}) == 10                      # one paragraph per list
    assert not {k.source_id for k in it1} & {k.source_id for k in it2}  # next iteration: fresh paragraphs
    by_id = {p.id: p for p in corpus.paragraphs}
    for k in it1 + it2:
        assert len(set(k.keywords)) == 3
        assert set(k.keywords) <= set(by_id[k.source_id].candidates)   # all three from that one paragraph
        assert k.text == ", ".join(k.keywords)
    assert sample_keyword_lists(corpus, 10, seed=0, iteration=1, cfg=cfg) == it1  # reproducible
    assert sample_keyword_lists(corpus, 10, seed=1, iteration=1, cfg=cfg) != it1
    with pytest.raises(ValueError, match="larger than the keyword corpus"):
        sample_keyword_lists(corpus, 31, seed=0, iteration=1, cfg=cfg)


def test_default_corpus_is_builtin_plus_seed_prompts():
    cfg = KeywordsConfig()
    without = build_corpus(KeywordsConfig(include_seed_prompts=False), [])
    with_seeds = build_corpus(cfg, [(s.id, s.prompt) for s in SEEDS])
    assert len(without.paragraphs) >= 240  # the builtin corpus: 249 paragraphs
    seed_paras = [p for p in with_seeds.paragraphs if p.id.startswith("seed:")]
    assert {p.id for p in seed_paras} == {"seed:a", "seed:b", "seed:c", "seed:d"}  # "Hi." has no keywords


# ----------------------------------------------------------------------------------- templates / SFT data
def test_templates_are_the_papers():
    p = generator_prompt("glacier, oven, violin")
    assert "Design ONE question/instruction (and its solution) with given keywords." in p
    assert "## Given Keywords\nglacier, oven, violin\n## Output Format" in p
    assert p.endswith("## Output\n== GENERATED QUESTION & CORRECT SOLUTION ==")
    assert generator_target(" Why? ", "Because. ") == "<question> Why? </question>\n<solution> Because. </solution>"
    i = improver_prompt("What is 2+2?", "5")
    assert i.startswith("You are a smart AI assistant. For a given question-answer pair, improve the answer")
    assert i.endswith("Given Question: What is 2+2?\nOriginal Answer: 5\nRewritten Answer:")


def test_generator_examples_use_two_own_keywords_and_one_noise_keyword(tmp_path):
    rows, skipped = generator_examples(SEEDS, seed=0)
    assert skipped == {"too_few_keywords": 1} and len(rows) == 4
    cands = {s.id: set(extract_keywords(s.prompt)) for s in SEEDS}
    by_id = {s.id: s for s in SEEDS}
    for r in rows:
        kws = r["keywords"].split(", ")
        own = [w for w in kws if w in cands[r["seed_id"]]]
        noise = [w for w in kws if w not in cands[r["seed_id"]]]
        assert len(own) == 2 and len(noise) == 1
        assert any(noise[0] in cands[o] for o in cands if o != r["seed_id"])
        assert r["prompt"] == [{"role": "user", "content": generator_prompt(r["keywords"])}]
        s = by_id[r["seed_id"]]
        assert r["completion"] == [{"role": "assistant", "content": generator_target(s.prompt, s.response)}]
    assert generator_examples(SEEDS, seed=0)[0] == rows  # reproducible

    path = write_sft(tmp_path / "gen.parquet", rows)
    table = pq.read_table(path)
    assert str(table.schema.field("prompt").type) == "list<element: struct<role: string, content: string>>"
    assert str(table.schema.field("completion").type) == str(table.schema.field("prompt").type)


def test_sft_rows_train_only_the_completion(tmp_path, tiny_model_path):
    """The trainer's own SFT tokenisation: the template prompt is masked, the <question> target is learned."""
    from transformers import AutoTokenizer

    from selfalign_ray.train.data import IGNORE, sft_example

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rows, _ = generator_examples(SEEDS, seed=0)
    rows.append(improver_example(SEEDS[0], "Glaciers are cold."))
    write_sft(tmp_path / "sft.parquet", rows)
    for row in pq.read_table(tmp_path / "sft.parquet").to_pylist():
        ex = sft_example(tok, row, max_length=1024, max_prompt_length=768)
        learned = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
        target = row["completion"][0]["content"]
        assert learned.startswith(target)
        assert "Given Keywords" not in learned and "Rewritten Answer" not in learned
    assert improver_example(SEEDS[0], "Glaciers are cold.")["prompt"][0]["content"] == \
        improver_prompt(SEEDS[0].prompt, "Glaciers are cold.")


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,stopped,expected", [
    ("<question> How do tides work? </question>\n<solution> The moon. </solution>", False, "How do tides work?"),
    ("== GENERATED QUESTION & CORRECT SOLUTION ==\n<question>What is basalt?</question>", False, "What is basalt?"),
    ("<question> Why is the sky blue?", True, "Why is the sky blue?"),            # cut at the stop string
    ("<Question> Name three glaciers. <solution> Aletsch ... </solution>", False, "Name three glaciers."),
    ('<question> "Plan a garden watering schedule." </question>', False, "Plan a garden watering schedule."),
])
def test_parse_question_good_outputs(text, stopped, expected):
    assert parse_question(text, stopped) == (expected, None)


@pytest.mark.parametrize("text,stopped,reason", [
    ("### Question\nWhat is the capital of France?", False, "no_question_tag"),
    ("<question> Why do volcanoes erupt and how", False, "unterminated_question"),  # hit max_tokens
    ("<question>   </question>", False, "empty_question"),
    ("<question> question content ... </question>", False, "echoed_template"),
    ("<question> Design ONE question/instruction with given keywords </question>", False, "echoed_template"),
    ("<question> Why? </question>", False, "too_short"),
])
def test_parse_question_bad_outputs(text, stopped, reason):
    assert parse_question(text, stopped) == (None, reason)


def test_parse_question_without_required_tags():
    assert parse_question("What makes bread rise? <solution> yeast </solution>", require_tags=False) == \
        ("What makes bread rise?", None)
    assert parse_question("What makes bread rise?", require_tags=True) == (None, "no_question_tag")


# ----------------------------------------------------------------------------------------- repetition
def test_repetition_rate():
    assert repetition_rate("The quick brown fox jumps over the lazy dog near the river bank.") == 0.0
    assert repetition_rate("too short") == 0.0
    once = "Drink water every morning before breakfast"
    # m words said twice: 2m - 2 trigrams, m - 2 of them repeat the first copy -> (m - 2) / (2m - 2).
    assert repetition_rate(f"{once}. {once}.") == pytest.approx(4 / 10)
    assert repetition_rate(f"{once}. {once}.", n=1) == pytest.approx(6 / 12)
    looped = repetition_rate(" ".join(["I am sure."] * 12))
    assert looped > 0.9
    assert repetition_rate("a b a b a b", n=1) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        repetition_rate("x", n=0)
