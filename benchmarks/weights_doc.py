"""The weight-update figures of ``docs/benchmarks.md``, written from the results files of
``benchmarks/weights.py`` (``weights.json``: 214 MB, ``weights_1gb.json``: 1.07 GB) between the
page's ``<!-- weights.py -->`` markers, each time the benchmark writes one: the page shows what
the files hold, and ``tests/test_docs.py`` checks that it still does.

    .venv/bin/python benchmarks/weights_doc.py   # rewrite the block from the files as they are
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import doc_block
from benchmarks.common import BENCH_SPEC
from pr2_serve.server.server_config import UPLOAD_BUCKET_MIB

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS = [ROOT / "benchmarks" / "results" / f for f in ("weights.json", "weights_1gb.json")]
PROFILE = ROOT / "benchmarks" / "results" / "weights_profile.json"
BEGIN, END = "<!-- weights.py -->", "<!-- /weights.py -->"
TRANSPORTS = ("http", "grpc", "gloo", "load")
GOALS = {"http": 300, "gloo": 400}  # MB/s end to end on the 214 MB checkpoint


def render(runs: list[dict]) -> str:
    """The block's markdown for the results files' contents ``runs``."""
    lines = [
        "| checkpoint | transport | end to end, MB/s | baseline, MB/s | new ÷ baseline | "
        "peak extra RSS, MiB (largest) | bound, MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines += _rows(run["args"], run["results"])
    first = runs[0]["args"]
    lines += [
        "",
        f"Medians of {first['repeats']} updates per transport and server after "
        f"{first.get('warmup', 0)} untimed (1.07 GB: {runs[-1]['args']['repeats']} after "
        f"{runs[-1]['args'].get('warmup', 0)}); the baseline is the staged path (receive into a "
        f"file, check it, reload everything, canary) at `{first['baseline_ref']}`, both servers "
        "up at once, alternating. Bound: the undo (the old values of the whole model, for a full "
        "update) + 2 "
        f"buckets ({UPLOAD_BUCKET_MIB:g} MiB for uploads and loads, {first['bucket_mib']} MiB "
        "for gloo); ✓: the median within it (the largest of the repeats in brackets). The CPU "
        "MoE prepack packs each expert in place: vLLM's own "
        "packs a whole tensor into a new one, which held one MoE layer's experts twice for a "
        f"moment ({_moe_layer_mib(runs[-1]['args']):.0f} MiB at {runs[-1]['args']['experts']} "
        "experts, the excess over the bound before). Bucket buffers are mappings of their own, "
        "reused within an update and let go, memory and all, from its last bucket on: "
        "allocated per bucket on the heap, they left the 1.07 GB rows over the bound before.",
    ]
    held = [
        _held(run["results"]) for run in runs if "rss_before_MiB" in run["results"]["new"]["http"]
    ]
    if held:
        lines += [
            "",
            "The server's RSS just before an update (medians; its peak is this + the extra): "
            + "; ".join(held)
            + ". No bucket buffer is kept between updates (they go with the last bucket); the "
            "old values the undo held are (`pr2_serve/plugin/spare_storage.py`), and the next "
            "update's new tensors are made in them, where fresh memory was faulted in page by "
            "page: the RSS before an update includes them (at most the last update's undo; the "
            "baseline's alongside), reserved between updates instead of taken anew, and a full "
            "update's extra is about its buckets.",
        ]
    paired = [_paired(run["results"]) for run in runs if "paired" in run["results"]]
    if paired:
        lines += ["", "gRPC ÷ HTTP on this tree, paired by repeat: " + "; ".join(paired) + "."]
    writes = [
        f"{r['state_dict_MB']:.0f} MB into a new file at {r['file_write_MBps']['median']:.0f} "
        f"MB/s, over one at {r['file_overwrite_MBps']['median']:.0f} MB/s"
        for r in (run["results"] for run in runs)
        if "file_overwrite_MBps" in r
    ]
    if writes:
        lines += [
            "",
            "The same bytes written on the state directory's disk once per repeat, in the same "
            "run, into a new file (the baseline writes every version so) and over a file "
            "written before (an update writes over the spare a removed version left, when "
            "nobody else holds it): " + "; ".join(writes) + ".",
        ]
    return "\n".join(lines)


def _held(res: dict) -> str:
    sides = [
        f"{side} "
        + ", ".join(
            f"{way} {res[side][way]['rss_before_MiB']:.0f}"
            for way in TRANSPORTS
            if way in res[side]
        )
        for side in ("new", "baseline")
        if side in res and "rss_before_MiB" in res[side]["http"]
    ]
    return f"{res['state_dict_MB']:.0f} MB: {'; '.join(sides)} MiB"


def _paired(res: dict) -> str:
    p = res["paired"]["new_grpc_vs_new_http"]
    lo, hi = p["ci95"]
    return (
        f"{res['state_dict_MB']:.0f} MB, median {p['median']:.2f}x (95 % interval {lo:.2f}-"
        f"{hi:.2f}, {len(p['per_repeat'])} repeats)"
    )


def _moe_layer_mib(args: dict) -> float:
    """One MoE layer's expert weights (gate, up, down; fp32) in the bench model of ``args``."""
    return (
        args["experts"] * 3 * BENCH_SPEC.hidden_size * BENCH_SPEC.moe_intermediate_size * 4 / 2**20
    )


def _rows(args: dict, res: dict) -> list[str]:
    size, new, base = res["state_dict_MB"], res["new"], res.get("baseline", {})
    out = []
    for way in TRANSPORTS:
        if way not in new:
            continue
        mbps = new[way]["end_to_end_MBps"]
        b = base.get(way, {}).get("end_to_end_MBps")
        bucket = (args["bucket_mib"] if way == "gloo" else UPLOAD_BUCKET_MIB) * 2**20
        bound = (size * 1e6 + 2 * bucket) / 2**20
        goal = GOALS.get(way) if size < 500 else None
        mark = "" if goal is None else (" ✓" if mbps >= goal else f" (goal {goal})")
        rss, most = new[way]["peak_extra_rss_MiB"], new[way]["peak_extra_rss_MiB_max"]
        largest = f" ({most:.0f})"
        out.append(
            f"| {size:.0f} MB | {way} | {mbps:.0f}{mark} | "
            f"{'' if b is None else f'{b:.0f}'} | {'' if b is None else f'{mbps / b:.2f}x'} | "
            f"{rss:.0f}{largest}{' ✓' if rss <= bound else ''} | {bound:.0f} |"
        )
    return out


def render_profile(res: dict) -> str:
    """One sentence of where one update's time goes (``--profile``)."""
    p, size = res["profile"], res["state_dict_MB"]
    return (
        f"Where one {size:.0f} MB update's time goes (`weights_profile.json`, medians): reading "
        f"its file {p['read_file_s']:.2f} s; on the engine thread, the finite checks "
        f"{p['finite_check_s']:.2f} s, vLLM's `load_weights` with the copy into the live "
        f"storage {p['load_weights_and_copy_s']:.2f} s, the CPU MoE prepack "
        f"{p['cpu_moe_prepack_s']:.2f} s, an undo made of copies {p['undo_copies_s']:.2f} s "
        f"({p['undo_MB']:.0f} MB: what vLLM's path off the CPU needs; on the CPU the undo keeps "
        f"the old storage, no copy), zeroing the KV cache {p['zero_kv_cache_s']:.3f} s, the "
        f"canary {p['canary_s']:.2f} s: the whole live update {p['engine_live_apply_s']:.2f} s "
        f"+ canary (~{size / (p['engine_live_apply_s'] + p['canary_s']):.0f} MB/s, what no "
        f"transport can beat here); the content fingerprints (XXH3, on a thread) "
        f"{p['digests_s']:.2f} s."
    )


def block() -> str:
    runs = [json.loads(p.read_text()) for p in RESULTS if p.exists()]
    text = render(runs)
    if PROFILE.exists():
        text += "\n\n" + render_profile(json.loads(PROFILE.read_text())["results"])
    return f"{BEGIN}\n{text}\n{END}"


def rewrite() -> None:
    """Put :func:`block` between the page's markers."""
    doc_block.rewrite(PAGE, BEGIN, END, block(), "weights")


if __name__ == "__main__":
    rewrite()
