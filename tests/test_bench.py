"""The bench's pieces on a tiny model: inputs, raw ONNX Runtime timing, profile, report (no timings pinned)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from bench import contenders, corpus, hosts, load, plan, profile, raw, report, stats, sweep
from tests.documented import BATCH_SIZES, SEQUENCE_LENGTHS
from worker.serving.registry import load_model

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny" / "bert"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(TINY)


def test_harvest_keeps_plain_sentences_only_and_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "guide.md").write_text(
        "# Heading\n\nThe worker reads requests from Kafka. It answers every one of them!\n\n"
        "Run `make test` now. Call foo_bar(x) = 3. Too short.\n"
    )
    (tmp_path / "module.py").write_text('def f():\n    """Return the answer to the question."""\n')
    (tmp_path / "notes.bin").write_text("Binary files are never read by the harvester.")
    sentences, files = corpus.harvest_sentences([tmp_path], 10)
    assert files == 2
    assert sorted(sentences) == [
        "It answers every one of them!",
        "Return the answer to the question.",
        "The worker reads requests from Kafka.",
    ]
    assert corpus.harvest_sentences([tmp_path], 2)[0] == corpus.harvest_sentences([tmp_path], 2)[0]
    assert len(corpus.harvest_sentences([tmp_path], 2)[0]) == 2


def test_fixed_length_texts_tokenize_to_exactly_that_length(tokenizer: Any) -> None:
    sentences = ["The cat sat on the mat while the dog slept.", "Prices rose again this spring."] * 5
    texts = corpus.fixed_length_texts(tokenizer, sentences, 24, 3)
    assert len(texts) == 3
    assert corpus.token_lengths(tokenizer, texts) == [24, 24, 24]


def test_padded_batches_are_length_sorted_and_padded_to_their_longest_row() -> None:
    encodings = [[1] * n for n in (5, 2, 9, 3, 7)]
    batches = raw.padded_batches(encodings, 2, ["input_ids", "attention_mask"])
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (2, 7), (1, 9)]
    assert [b["attention_mask"].sum(axis=1).tolist() for b in batches] == [[2, 3], [5, 7], [9]]
    fixed = raw.padded_batches(encodings, 4, ["input_ids", "attention_mask", "token_type_ids"], pad_to=8)
    assert {b["input_ids"].shape[1] for b in fixed} == {8}
    assert fixed[-1]["attention_mask"].sum() == 8  # the 9-token row is cut to 8


def test_raw_compare_runs_every_case_on_the_tiny_model(tokenizer: Any) -> None:
    encodings = tokenizer(["a short one", "a somewhat longer sentence than that"] * 4)["input_ids"]
    cases = {
        "one at a time": raw.RawCase(encodings, 1),
        "fours, padded to 16, no spinning": raw.RawCase(
            encodings, 4, 16, {"session.intra_op.allow_spinning": "0"}
        ),
    }
    rates, cpu_ms = raw.raw_compare(TINY / "model.onnx", cases, repeats=2)
    assert set(rates) == set(cases) == set(cpu_ms)
    assert all(len(s.values) == 2 and s.low <= s.median <= s.high and s.low > 0 for s in rates.values())
    assert all(s.low >= 0 for s in cpu_ms.values())


def test_the_head_to_heads_raw_pass_embeds_as_the_naive_consumer_does(tokenizer: Any) -> None:
    """Tokenize, run and mean-pool in one process, at one batch size, timed again in each round."""
    import onnxruntime as ort

    texts = ["a short one", "a somewhat longer sentence than that", "mid length text"] * 3
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    one_size = raw.RawPass(TINY, texts, lengths, 4)
    batched = one_size.embed(texts[:3])
    session = ort.InferenceSession(str(TINY / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for row, text in zip(batched, texts[:3], strict=True):
        alone = tokenizer([text], return_tensors="np")
        hidden = session.run(None, {name: alone[name] for name in names})[0]
        np.testing.assert_allclose(row, raw.mean_pooled(hidden, alone["attention_mask"])[0], atol=1e-5)
    assert abs(float(np.linalg.norm(batched[0])) - 1.0) < 1e-5
    two_at_once = raw.RawPass(TINY, texts, lengths, 4, in_flight=2)
    np.testing.assert_allclose(two_at_once.embed(texts[:3]), batched, atol=1e-5)
    passes = [one_size.measure(), two_at_once.measure(), two_at_once.measure()]
    assert all(p["sentences_per_s"] > 0 and p["cpu_ms_per_sentence"] >= 0 for p in passes)
    best = contenders.best_of({"1 at once": passes[0], "2 at once": passes[1]})
    assert best["sentences_per_s"] == max(p["sentences_per_s"] for p in passes[:2])
    assert best["passes"]["2 at once"] == passes[1]


def test_the_fused_copy_computes_what_the_model_does(tokenizer: Any, tmp_path: Path) -> None:
    fused, report = raw.fused_copy(TINY / "model.onnx", tmp_path / "fused.onnx")
    assert fused is not None, report
    assert report["fused_operators"].get("Attention") == 2, "both tiny BERT layers' attention is fused"
    encoded = tokenizer(
        ["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="np"
    )
    plain, joined = (raw.raw_session(path) for path in (TINY / "model.onnx", fused))
    names = [i.name for i in plain.get_inputs()]
    feed = {name: encoded[name].astype(np.int64) for name in names}
    np.testing.assert_allclose(joined.run(None, feed)[0], plain.run(None, feed)[0], atol=1e-4)
    rates, _ = raw.raw_compare(
        TINY / "model.onnx", {"fused": raw.RawCase(encoded["input_ids"], 2, model=fused)}, 1
    )
    assert rates["fused"].median > 0


def test_spread_and_percentiles_summarise_measurements() -> None:
    spread = stats.Spread.of([3.0, 1.0, 2.0])
    assert (spread.median, spread.low, spread.high) == (2.0, 1.0, 3.0)
    assert str(spread) == "2 [1-3]"
    summary = stats.percentiles(list(np.arange(1.0, 101.0)), (50, 99))
    assert summary == {"p50": 50.5, "p99": 99.0, "max": 100.0}
    assert stats.percentiles([]) == {}


def test_spaced_sample_keeps_the_spread_of_the_input() -> None:
    assert corpus.spaced_sample(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert corpus.spaced_sample([1, 2], 5) == [1, 2]


def test_classify_names_the_first_known_frame_from_the_innermost_out() -> None:
    frame = sys._getframe()
    assert profile.classify(frame)[0] == "other"
    assert profile.classify(None)[0] == profile.IDLE
    assert profile.thread_group("inference_0") == "executor threads"
    assert profile.thread_group("MainThread") == "event loop thread"


def test_stack_sampler_attributes_a_busy_executor_thread() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    busy = threading.Thread(target=spin, name="inference_0")
    sampler = profile.StackSampler(interval=0.002)
    busy.start()
    sampler.start()
    deadline = time.monotonic() + 10
    while sampler.samples < 40:  # enough samples to attribute the spinning thread's time
        assert time.monotonic() < deadline, f"{sampler.samples} samples in 10 s"
        time.sleep(0.01)
    summary = sampler.stop()
    stop.set()
    busy.join()
    assert summary["samples"] > 0
    assert summary["thread_time_pct_by_group"]["executor threads"]["other"] > 50
    assert "executor threads" in summary["cpu_s_by_thread_group"]


def test_stage_costs_cover_every_stage_of_the_worker_on_a_tiny_model() -> None:
    model = load_model(TINY)
    costs = profile.stage_costs(model, ["Hello there.", "A longer sentence about nothing much."] * 3, 8)
    assert costs["sentences"] == 6
    assert len(costs["ms_per_sentence"]) == 5
    assert abs(sum(costs["share_pct"].values()) - 100) < 1


def _runs(throughput: float, p99: float = 40.0, batch_ms: float = 5.0) -> list[dict[str, Any]]:
    return [
        {
            "requests": 10,
            "answered": 10,
            "throughput_per_s": throughput,
            "offered_per_s": None,
            "cpu_s": {"worker": 0.5},
            "latency_ms": {"p50": p99 / 2, "p90": p99 * 0.8, "p99": p99},
            "batch_inference_ms": {"p50": batch_ms},
            "peak_rss_mib": 500.0,
        }
    ]


def _rounds(*throughputs: float) -> list[dict[str, Any]]:
    """One saturated run per round of the head-to-head."""
    return [run for value in throughputs for run in _runs(value)]


def _passes(one: float, two: float) -> dict[str, dict[str, float]]:
    """A round's raw passes: one batch at a time, and two at once."""
    return {
        raw.in_flight_label(n): {"sentences_per_s": rate, "cpu_ms_per_sentence": 1.0}
        for n, rate in ((1, one), (2, two))
    }


def _spread(value: float) -> dict[str, Any]:
    return stats.Spread.of([value]).to_json()


def fake_result() -> dict[str, Any]:
    """The shape run_bench returns, with made-up numbers."""
    raw = {
        "by_batch_size": {"1": _spread(100.0), "8": _spread(200.0)},
        "best": {"batch_size": 8, "sentences_per_s": _spread(200.0), "cpu_ms_per_sentence": _spread(45.0)},
    }
    point = {"max_wait_ms": 10.0}
    return {
        "meta": {"model": "models/tiny/bert", "cpus": 2},
        "inputs": {
            "mix": {"sentences": 10, "tokens": {"p10": 5, "p50": 9, "p90": 20, "max": 30}},
            "fixed_128": {"texts": 4},
        },
        "raw_ort": {
            "length_sorted": raw,
            "padded_128": raw,
            "session_options": {
                "length_sorted": {
                    "batch_size": 8,
                    "default (as worker/serving/engine.py)": _spread(200.0),
                    "fused graph (transformer optimizer)": _spread(250.0),
                },
                "padded_128": {"batch_size": 8, "default (as worker/serving/engine.py)": _spread(200.0)},
            },
        },
        "head_to_head": {
            "order": "worker, raw ORT, naive ONNX",
            "raw_ort_batch_size": 8,
            # The machine ran faster in round 2: every contender's figure moves with it.
            "raw_ort": [
                {"sentences_per_s": 200.0, "cpu_ms_per_sentence": 45.0, "passes": _passes(200.0, 190.0)},
                {"sentences_per_s": 400.0, "cpu_ms_per_sentence": 50.0, "passes": _passes(300.0, 400.0)},
            ],
        },
        "sweep": [
            {
                "label": "defaults",
                "throughput_per_s": _spread(190.0),
                "half_load_p99_ms": _spread(18.0),
                "p99_bound_ms": 20.0,
                "buckets": 48,
            }
        ],
        "worker": {
            "label": "defaults",
            "settings": point,
            "saturation_mix": _rounds(190.0, 340.0),
            "saturation_fixed_128": _runs(150.0),
            "latency_vs_load": [{"fraction": 0.5, **_runs(95.0, p99=18.0)[0], "offered_per_s": 95.0}],
            "rss_idle_mib": 400.0,
            "rss_peak_mib": 500.0,
            "ort_sessions": 1,
            "buckets": {"total": 48, "bert": 48},
            "profile": {
                "busy_share_by_category_pct": {"engine (ONNX Runtime, buffers)": 90.0},
                "cpu_s_by_thread_group": {"executor threads": 10.0},
                "run": _runs(190.0)[0],
            },
            "profile_half_load": {
                "busy_share_by_category_pct": {"asyncio event loop": 20.0},
                "cpu_s_by_thread_group": {"event loop thread": 1.5},
                "run": {**_runs(95.0)[0], "batch_size": {"mean": 1.8}},
            },
            "stage_costs": {"engine_sentences_per_s": 210.0},
            "stage_costs_128_tokens": {"engine_sentences_per_s": 45.0},
            "idle": {
                "seconds": 10.0,
                "no Worker attached": {"worker": 0.0, "broker (tansu)": 0.5},
                "defaults": {"worker": 0.8, "broker (tansu)": 1.5},
            },
        },
        "naive_onnx": {
            "saturation_mix": _rounds(50.0, 140.0),
            "latency_vs_load": [{"fraction": 0.5, **_runs(95.0, p99=30.0)[0], "offered_per_s": 95.0}],
        },
        "naive_torch": {"skipped": "no torch"},
    }


def test_assess_takes_ratios_within_rounds_and_judges_each_target() -> None:
    result = fake_result()
    report.assess(result)
    assert result["ratios"] == {
        "worker/raw_ort_best": 0.9,  # 0.95 and 0.85 within rounds; the ratio of medians would be 0.88
        "worker/raw_ort_one_batch_at_a_time": 1.04,  # 0.95 and 1.13: round 2's best ran two at once
        "naive_onnx/raw_ort_one_batch_at_a_time": 0.36,  # 0.25 and 0.47
        "worker/naive_onnx": 3.11,  # 3.8 and 2.43
        "naive_onnx/raw_ort_best": 0.3,  # 0.25 and 0.35
        "worker_cpu_per_request/raw_ort_cpu_per_sentence": 1.06,  # 50 ms a request vs 45 and 50 ms
        "worker_128/raw_ort_padded_128_best": 0.75,
        "worker/raw_ort_fused_graph": 1.06,  # the raw stage's figure: 265 (median) / 250
        "worst worker p99 / naive ONNX p99 at one offered load": 0.6,
        "worker_paced_capacity/flood": 0.36,  # 95/s held (the one paced run) against 265/s flooded
        "worker_cpu_per_request_at_half_load/flooded": 1.0,  # 50 ms a request either way
    }
    assert result["ratios_by_round"]["worker/raw_ort_best"] == [0.95, 0.85]
    # naive ONNX too weak, no naive PyTorch, the paced capacity short of 0.85, every other target met
    # (idle: 0.8 + 1.5 - 0.5 = 1.8%)
    met = {t["target"].split(" (")[0].split(" >=")[0].split(" <=")[0]: t["met"] for t in result["targets"]}
    assert met == {
        "naive ONNX": False,
        "naive PyTorch": None,
        "worker": True,
        "worker CPU per request": True,
        "p99 at 50% load": True,
        "paced capacity": False,
        "worker CPU per request at 50% load": True,
        "worker p99": True,
        "idle worker + the broker CPU it causes": True,
        "worker RSS": True,
    }


def test_the_paced_capacity_is_the_highest_rate_held_within_both_limits() -> None:
    def paced(offered: float, achieved: float, p99: float) -> dict[str, Any]:
        return {"offered_per_s": offered, "throughput_per_s": achieved, "latency_ms": {"p99": p99}}

    runs = [
        paced(100.0, 100.0, 40.0),
        paced(200.0, 197.0, 240.0),  # 98.5% achieved, p99 under 250 ms: held
        paced(250.0, 249.0, 260.0),  # p99 over 250 ms
        paced(300.0, 280.0, 200.0),  # 93% achieved
    ]
    assert report.paced_capacity(runs) == 200.0
    assert report.paced_capacity(runs[2:]) == 0.0


def _row(label: str, throughput: float, p99: float) -> dict[str, Any]:
    return {
        "label": label,
        "throughput_per_s": _spread(throughput),
        "half_load_p99_ms": _spread(p99),
        "p99_bound_ms": 50.0,
    }


def test_best_setting_must_meet_the_latency_target_before_it_can_win() -> None:
    fast_but_slow_to_answer = _row("fast", 300.0, 900.0)
    steady = _row("steady", 250.0, 30.0)
    assert sweep.pick_best([fast_but_slow_to_answer, steady]) == "steady"
    assert sweep.pick_best([fast_but_slow_to_answer]) == "fast"
    # None meets the target: the quickest to answer among those within 10% of the fastest.
    nearly_as_fast = _row("nearly", 280.0, 600.0)
    slow = _row("slow", 200.0, 100.0)
    assert sweep.pick_best([fast_but_slow_to_answer, nearly_as_fast, slow]) == "nearly"


def test_the_defaults_stay_unless_another_point_beats_them_by_more_than_the_noise() -> None:
    # None meets its bound (50 ms): the quickest to answer, unless the defaults are as quick within 10%.
    defaults, tied = _row("defaults", 335.0, 70.0), _row("coarse", 332.0, 68.0)
    assert sweep.pick_best([defaults, tied]) == "defaults", "a tie within the noise keeps the defaults"
    assert sweep.pick_best([defaults, tied, _row("quicker", 330.0, 55.0)]) == "quicker"
    # Both meet it: the fastest, unless the defaults are as fast within 10%.
    meeting = _row("defaults", 335.0, 20.0)
    assert sweep.pick_best([meeting, _row("a bit faster", 360.0, 20.0)]) == "defaults"
    assert sweep.pick_best([meeting, _row("much faster", 400.0, 20.0)]) == "much faster"


def test_report_renders_a_table_and_a_plot(tmp_path: Path) -> None:
    result = fake_result()
    report.assess(result)
    table = report.render_table(result)
    assert "raw ORT" in table and "worker e2e" in table and "naive ONNX" in table
    assert "no torch" in table
    assert "profiled run, at half load (95/s, batch mean 1.8)" in table, "the CPU breakdown at half load"
    # matplotlib is in the test extra: a missing one fails here instead of skipping the plot.
    assert report.plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_quick_plan_shrinks_every_size_and_explicit_counts_win() -> None:
    full, quick = plan.Plan.make(quick=False, sentences=None, repeats=None), plan.Plan()
    assert full == quick
    small = plan.Plan.make(quick=True, sentences=50, repeats=1)
    assert (small.sentences, small.repeats) == (50, 1)
    assert (
        small.rounds < full.rounds
        and plan.Plan.make(quick=True, sentences=None, repeats=None, rounds=3).rounds == 3
    )
    assert small.sweep_sentences < full.sweep_sentences and len(small.sweep) < len(full.sweep)
    assert full.sweep[0].settings == {} and full.sweep[0].overrides == {}, "the first point is the defaults"


@pytest.mark.kafka
async def test_worker_and_naive_consumer_answer_every_bench_request(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    sizes = plan.Plan(repeats=1, warmup=4, naive_sentences=6)
    ctx = plan.Context(sizes, TINY, None, tmp_path, bootstrap=kafka_bootstrap, model_name="bert")
    texts = [f"Sentence number {i} is short." for i in range(12)]
    inputs = plan.Inputs(mix=texts, fixed=["a b c d e f g h"], encodings=[], files_read=0)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(load.LoadClient(kafka_bootstrap, "bert"))
        host = await hosts.Host.start(ctx, plan.SweepPoint("defaults"), with_extras=False)
        stack.push_async_callback(host.child.close)
        assert host.buckets == {"bert": len(BATCH_SIZES) * len(SEQUENCE_LENGTHS)}
        topics = [
            await host.serve(ctx, plan.SweepPoint(f"wait {ms} ms", {"max_wait_ms": ms})) for ms in (2, 20)
        ]
        naive_pid, naive_topic = await contenders.start_naive(
            ctx, client, "onnx", inputs, stack, sys.executable
        )
        for topic in topics:
            await hosts.warm_up(client, topic, ctx, inputs)
            saturated = (await client.run(topic, texts)).summary()
            assert (saturated["answered"], saturated["errors"]) == (12, 0)
            assert 1 <= saturated["batch_size"]["max"] <= 12
            paced = (await client.run(topic, texts[:5], rate=50.0)).summary()
            assert paced["answered"] == 5 and paced["offered_per_s"] == 50.0
            await host.stop(topic)  # drained and stopped: the next point runs alone
        # /proc counts CPU in 10 ms ticks, sampled: six requests (one CI run) read 0.0 for every
        # process. A hundred and twenty cost the naive consumer several ticks however busy the machine.
        many = [texts[i % len(texts)] for i in range(120)]
        answered = await contenders.measured(ctx, "naive onnx", naive_pid, client.run(naive_topic, many))
        assert (answered["answered"], answered["errors"]) == (120, 0)
        assert answered["cpu_s"]["naive onnx"] > 0, answered["cpu_s"]
        assert answered["peak_rss_mib"] > 0
