"""``evaluate_tasks`` / ``colabridge eval tasks``: official 8-task protocol on JSONL records."""

import json
import zlib

import pytest
import torch

from colabridge.cli import build_parser
from colabridge.cli import main as cli_main
from colabridge.eval import tasks as T
from colabridge.eval.templates import TASKS, apply_prompt_template

torch.set_num_threads(1)

# One made-up record per task; each answer is the text a perfect model would generate.
RECORDS = {
    "lambada": {"id": 0, "question": "She opened the door and saw her", "answer": "brother"},
    "squad": {"id": "q1", "question": "Where is the tower?", "context": "The tower stands in Paris.", "answer": "Paris"},
    "obqa": {"id": 2, "question": "What melts ice?", "choices": ["heat", "cold", "dark", "wind"], "answer": "heat"},
    "mmlu": {"id": 3, "question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": "4"},
    "hellaswag": {"id": 4, "question": "He lights the candle. The flame", "choices": ["glows.", "sings.", "runs.", "eats."],
                  "ground_truth": "glows."},
    "race": {"id": 5, "question": "Tom has a cat. What does Tom have?", "choices": ["a dog", "a cat", "a car", "a hat"],
             "answer": "B"},
    "siqa": {"id": 6, "question": "Ann won. How does Ann feel?", "choices": ["sad", "happy", "bored"], "answer": "happy"},
    "story_cloze": {"id": 7, "question": "I planted seeds. I watered them daily.",
                    "choices": ["They grew into flowers.", "They flew away."], "answer": "They grew into flowers."},
}
GOLD_GENERATION = {"race": " (B) a cat"}  # a letter answer: the generation states letter and text


def _prompt(task):
    """The official template's prompt for the task's made-up record."""
    r = RECORDS[task]
    return apply_prompt_template(task, r["question"], r.get("context", ""), r.get("choices"))


def _fake_generation(texts_for):
    """A stand-in for ``generate_texts`` that records the prompts it gets."""
    seen = []

    def fake(pipe, prompts, record_ids, chat=False, **kwargs):
        seen.extend(prompts)
        return [texts_for(p) for p in prompts]

    return fake, seen


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.mark.parametrize("name,task,chat", [("template_mmlu", "mmlu", False), ("sft_wrapped", "lambada", True)])
def test_generations_match_official_fixture(official_pipe, reference, name, task, chat):
    scenario = reference["scenarios"][name]
    samples = scenario["results"]["fp32"]["samples"]
    records = [dict(p, answer=p.get("answer", "x")) for p in scenario["prompts"]]
    result = T.evaluate_tasks(official_pipe, {task: records}, max_new_tokens=scenario["call_kwargs"]["max_new_tokens"],
                              chat=chat, batch_size=1)
    rows = result["predictions"][task]
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in samples]
    assert [r["generate"] for r in rows] == [s["generate"] for s in samples]
    assert result["tasks"][task]["total"] == len(samples)


def test_prompts_are_the_templates_and_gold_generations_score_one(monkeypatch):
    gold = {_prompt(t): GOLD_GENERATION.get(t, " " + T.reference_answer(r) + "\nnext line") for t, r in RECORDS.items()}
    fake, seen = _fake_generation(gold.__getitem__)
    monkeypatch.setattr(T, "generate_texts", fake)
    result = T.evaluate_tasks(None, {t: [r] for t, r in RECORDS.items()})
    assert seen == list(gold)
    assert list(result["tasks"]) == list(TASKS)
    assert all(s == {"accuracy": 1.0, "correct": 1, "total": 1} for s in result["tasks"].values())
    assert result["average"] == 1.0


def test_wrong_generations_score_zero(monkeypatch):
    fake, _ = _fake_generation(lambda prompt: " zebra\n")
    monkeypatch.setattr(T, "generate_texts", fake)
    result = T.evaluate_tasks(None, {t: [r] for t, r in RECORDS.items()})
    assert all(s["accuracy"] == 0.0 and s["total"] == 1 for s in result["tasks"].values())
    row = result["predictions"]["mmlu"][0]
    assert row == {"task": "mmlu", "id": 3, "prompt": _prompt("mmlu"), "generate": " zebra\n",
                   "ground_truth": "4", "choices": ["3", "4", "5", "6"], "correct": False}


def test_generation_settings_default_to_the_benchmark_script(monkeypatch):
    calls = []
    fake = lambda pipe, prompts, ids, chat=False, **kw: calls.append((ids, kw)) or ["x"] * len(prompts)  # noqa: E731
    monkeypatch.setattr(T, "generate_texts", fake)
    records = [dict(RECORDS["lambada"], id=i) for i in range(5)]
    result = T.evaluate_tasks(None, {"lambada": records}, limit=3, batch_size=2, guidance_scale=3.0)
    assert [ids for ids, _ in calls] == [[0, 1], [2]]
    assert calls[0][1] == {**T.OFFICIAL_GENERATION, "guidance_scale": 3.0}
    assert T.OFFICIAL_GENERATION == dict(max_new_tokens=32, num_inference_steps=16, guidance_scale=7.0,
                                         temperature=0.0, noise_seed=66, drop_finished=False)
    assert result["tasks"]["lambada"]["total"] == 3 and result["settings"]["limit"] == 3


def test_noise_sample_ids_follow_official_rule():
    assert [T.noise_sample_id(x, 4) for x in (7, "12", None)] == [7, 12, 4]
    assert T.noise_sample_id("56be4db0", 0) == zlib.crc32(b"56be4db0") & 0xFFFFFFFF


@pytest.mark.parametrize("line,message", [
    ({"question": "q", "choices": ["a", "b"]}, "mmlu record misses field(s) ['answer']"),
    ({"answer": "a", "choices": ["a", "b"]}, "mmlu record misses field(s) ['question']"),
    ({"question": "q", "answer": "a"}, "mmlu record misses field(s) ['choices']"),
    ({"question": "q", "choices": [], "answer": "a"}, "field 'choices' must be a non-empty list"),
    ({"question": "q", "choices": ["a", "b"], "answer": 1}, "field 'answer' must be a string"),
    ('{"question": "q", ', "invalid JSON"),
    ('["q"]', "expected a JSON object"),
    ({"task": "trivia", "question": "q", "answer": "a"}, "unknown task 'trivia'"),
    ({"task": "obqa", "question": "q", "choices": ["a"], "answer": "a"}, "record says task 'obqa' but the file holds 'mmlu'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "mmlu.jsonl", [RECORDS["mmlu"], line])
    with pytest.raises(ValueError) as err:
        T.load_task_records(path)
    assert f"{path}:2" in str(err.value)
    assert message in str(err.value)


def test_task_specific_fields_are_required(tmp_path):
    with pytest.raises(ValueError, match=r"squad\.jsonl:1: squad record misses field\(s\) \['context'\]"):
        T.load_task_records(_write_jsonl(tmp_path / "squad.jsonl", [{"question": "q", "answer": "a"}]))
    bad_story = dict(RECORDS["story_cloze"], choices=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"story_cloze\[0\]: story_cloze needs exactly 2 choices"):
        T.load_task_records({"story_cloze": [bad_story]})
    with pytest.raises(ValueError, match="unknown task 'trivia'"):
        T.load_task_records({"trivia": []})
    with pytest.raises(ValueError, match=r"no records for task\(s\) \['siqa'\]"):
        T.load_task_records({"mmlu": [RECORDS["mmlu"]], "siqa": []})


def test_layouts_folder_named_file_and_mixed_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "mmlu.jsonl", [RECORDS["mmlu"]] * 2)
    _write_jsonl(folder / "siqa.jsonl", ["", RECORDS["siqa"]])
    assert {t: len(r) for t, r in T.load_task_records(folder).items()} == {"mmlu": 2, "siqa": 1}
    assert list(T.load_task_records(folder, ["siqa"])) == ["siqa"]
    with pytest.raises(FileNotFoundError, match="race.jsonl"):
        T.load_task_records(folder, ["race"])
    with pytest.raises(ValueError, match=r"no records for task\(s\) \['race'\]"):
        T.load_task_records(folder / "mmlu.jsonl", ["mmlu", "race"])
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [dict(r, task=t) for t, r in RECORDS.items()])
    assert list(T.load_task_records(mixed)) == list(TASKS)
    assert list(T.load_task_records(mixed, "obqa")) == ["obqa"]
    plain = _write_jsonl(tmp_path / "records.jsonl", [RECORDS["obqa"]])
    with pytest.raises(ValueError, match="records.jsonl:1: no task for this record"):
        T.load_task_records(plain)
    assert list(T.load_task_records(plain, ["obqa"])) == ["obqa"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prompt_ids"):
        T.evaluate_tasks(None, {"mmlu": [RECORDS["mmlu"]]}, prompt_ids=[[1]])
    with pytest.raises(ValueError, match="batch_size"):
        T.evaluate_tasks(None, {"mmlu": [RECORDS["mmlu"]]}, batch_size=0)


def test_chat_wrapping_needs_single_token_pieces():
    split_user = lambda text, add_special_tokens: {"input_ids": [1, 2] if text == "user" else [9]}  # noqa: E731
    with pytest.raises(ValueError, match="'user' to be one token"):
        T.chat_token_ids(split_user)


def test_cli_tasks_end_to_end(tmp_path, fixture_dir, capsys):
    data = _write_jsonl(tmp_path / "obqa.jsonl", [RECORDS["obqa"], dict(RECORDS["obqa"], id=9, answer="cold")])
    preds, summary = tmp_path / "preds.jsonl", tmp_path / "summary.json"
    cli_main(["eval", "tasks", "--data", str(data), "--model", str(fixture_dir), "--max-new-tokens", "4",
              "--steps", "2", "--output", str(preds), "--summary", str(summary)])
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["task"], r["id"], r["ground_truth"]) for r in rows] == [("obqa", 2, "heat"), ("obqa", 9, "cold")]
    written = json.loads(summary.read_text())
    assert written["tasks"]["obqa"]["total"] == 2
    assert written["tasks"]["obqa"]["correct"] == sum(r["correct"] for r in rows)
    assert written["settings"]["num_inference_steps"] == 2
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["task", "n", "correct", "acc", "%"]
    assert table.splitlines()[1].split()[:2] == ["obqa", "2"]


@pytest.mark.parametrize("argv,func", [(["eval"], "cmd_eval"), (["eval", "--num-prompts", "3"], "cmd_eval"),
                                       (["eval", "heldout"], "cmd_eval"),
                                       (["eval", "tasks", "--data", "x.jsonl"], "cmd_eval_tasks")])
def test_bare_eval_still_runs_the_heldout_metrics(argv, func):
    assert build_parser().parse_args(argv).func.__name__ == func


def test_bare_eval_end_to_end(tmp_path, fixture_dir):
    texts = tmp_path / "held.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\nRain falls on the green hills every morning.\n")
    out = tmp_path / "held.json"
    cli_main(["eval", "--model", str(fixture_dir), "--data", str(texts), "--num-prompts", "2",
              "--max-new-tokens", "4", "--steps", "2", "--output", str(out)])
    result = json.loads(out.read_text())
    assert {"heldout_recon_acc", "heldout_fm", "generated", "real"} <= set(result)
    assert "gen_ppl" not in result  # 'auto' judge: none for a user's --model


def test_eval_scores_generated_and_real_text_under_a_judge(tmp_path, fixture_dir):
    from colabridge import ColaPipeline
    from colabridge.eval.ar_baseline import build_ar_model

    vocab = len(ColaPipeline.from_pretrained(fixture_dir).tokenizer)
    judge = tmp_path / "judge"
    build_ar_model(vocab, eos_id=0, n_embd=16, n_layer=1, n_head=2).save_pretrained(judge)
    texts = tmp_path / "held.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\nRain falls on the green hills every morning.\n"
                     "A small boat drifted slowly down the wide river.\n")
    out = tmp_path / "held.json"
    cli_main(["eval", "--model", str(fixture_dir), "--data", str(texts), "--num-prompts", "3", "--max-new-tokens", "4",
              "--steps", "2", "--judge", str(judge), "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["gen_ppl"] > 1 and result["real_gen_ppl"] > 1
    assert result["gen_ppl_ratio"] == pytest.approx(result["gen_ppl"] / result["real_gen_ppl"])
    lo, hi = result["gen_ppl_ratio_ci95"]
    assert lo <= hi


def test_eval_rejects_a_judge_with_another_vocabulary(tmp_path, fixture_dir):
    from colabridge.eval.ar_baseline import build_ar_model

    judge = tmp_path / "judge"
    build_ar_model(7, eos_id=0, n_embd=16, n_layer=1, n_head=2).save_pretrained(judge)
    texts = tmp_path / "held.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\n")
    with pytest.raises(ValueError, match="--judge .* vocabulary"):
        cli_main(["eval", "--model", str(fixture_dir), "--data", str(texts), "--judge", str(judge)])
