"""What a serving run reports (`executor run --requests K`): every figure from the measured trace and the
requests' records, through the simulator's own definitions — `spdsim.metrics.window_metrics` over [first
arrival, last finish] with prefill counted busy (DESIGN §3, as spdsim.serving counts it), TTFT / TPOT /
e2e and requests.csv from `spdsim.serving_metrics`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from spdsim.metrics import window_metrics
from spdsim.serving_metrics import request_rows, serving_metrics, write_requests_csv

RECORD_KEYS = ("arrival_s", "start_s", "first_token_s", "finish_s", "prompt_tokens", "new_tokens")


def serving_window(records, origin_ns: int) -> tuple[int, int]:
    """[first arrival, last finish] on the trace's clock (ns)."""
    t0 = origin_ns + int(round(min(r.arrival_s for r in records) * 1e9))
    t1 = origin_ns + int(round(max(r.finish_s for r in records) * 1e9))
    return t0, t1


def _text(ids: list[int]) -> str:
    return bytes(t for t in ids if t < 256).decode("utf-8", "replace")


def summarise_serving(res, job, spec, parts, transport: str, trace_dir: str | None) -> dict:
    from executor.ranks import RankLayout
    from spdsim.trace import Trace, TraceHeader, write_chrome_trace, write_trace
    sv = job.serving
    n, L = spec.stages, RankLayout(spec.stages, spec.tp)       # serving runs the co-located layout
    placement = [f"rank{L.rank(s)}" for s in range(n)]
    records = res.records
    tokens = sum(r.new_tokens for r in records)
    t0, t1 = serving_window(records, res.origin_ns)
    m = window_metrics(res.events, job.scheme, n, t0, t1, tokens, placement, phases=("prefill", "decode"))
    sm = serving_metrics(records)
    reqs = []
    for rec in records:
        r = rec.request
        row = {"request": r, "prompt": _text(sv["requests"][r]["prompt"]), "tokens": res.tokens[r],
               "ttft_ms": rec.ttft_s * 1e3, "tpot_ms": None if rec.new_tokens < 2 else rec.tpot_s * 1e3,
               **{k: getattr(rec, k) for k in RECORD_KEYS},
               "accepts": res.accepts[r], "confidences": res.confidences[r]}
        if res.references is not None:
            row["matches_reference"] = res.tokens[r] == res.references[r]
        reqs.append(row)
    point_id = f"{job.scheme}-n{n}-{sv.get('policy', 'fcfs')}-c{sv.get('concurrency', 1)}"
    if trace_dir:
        header = TraceHeader(scheme=job.scheme, stages=n, new_tokens=tokens, source="executor",
                             partition=[list(p) for p in parts], placement=placement,
                             prompt_tokens=sum(r.prompt_tokens for r in records), model=spec.model_label or spec.model,
                             device_kind=spec.device, tp=spec.tp,
                             extra={"transport": transport, "draft": job.draft, "threads": spec.threads,
                                    "serving": {"policy": sv.get("policy"), "concurrency": sv.get("concurrency"),
                                                "threshold": sv.get("threshold"), "arrivals": sv.get("arrivals"),
                                                "origin_ns": res.origin_ns},
                                    "accepts": {str(r): a for r, a in res.accepts.items()},
                                    **({"groups": L.groups(), "allreduce": spec.allreduce} if spec.tp > 1 else {})})
        for rank in range(L.world):
            write_trace(Path(trace_dir) / f"rank{rank}.jsonl", TraceHeader(**{**asdict(header), "rank": rank}),
                        [e for e in res.events if e.device == f"rank{rank}"])
        write_chrome_trace(Path(trace_dir) / "timeline.json", Trace(header, res.events))
        write_requests_csv(Path(trace_dir) / "requests.csv", request_rows(point_id, records))
    out = {"scheme": job.scheme, "stages": n, "policy": sv.get("policy"), "concurrency": sv.get("concurrency"),
           "arrivals": sv.get("arrivals"), "requests": reqs, "new_tokens": tokens,
           "tokens": [res.tokens[r.request] for r in records],
           "tokens_per_s": m.tokens_per_s, "ms_per_token": m.ms_per_token,
           "acceptance_rate": m.acceptance_rate, "bubble_ratio": m.bubble_ratio, "waste_ratio": m.waste_ratio,
           "accepted": m.accepted, "rejected": m.rejected, "utilization": list(m.utilization),
           "transport": transport, "partition": [list(p) for p in parts], "draft": job.draft,
           "model": spec.model_label or spec.model, "device": spec.device, "threads": spec.threads,
           "epochs": res.epochs, "tp": spec.tp, "gpus": L.world, "allreduce_share": m.allreduce_share,
           "point_id": point_id, **sm.columns()}
    if res.references is not None:
        out["matches_reference"] = all(row["matches_reference"] for row in reqs)
    return out


def print_serving(out: dict, trace_dir) -> None:
    """The text printout of a serving run: one line per request, then the run's figures."""
    from spdsim.textable import align
    print(f"{out['scheme']}  stages={out['stages']}  " + (f"tp={out['tp']}  " if out.get("tp", 1) > 1 else "")
          + f"policy={out['policy']}  concurrency={out['concurrency']}  {len(out['requests'])} requests"
          + (f"  arrivals={out['arrivals']}" if out.get("arrivals") else "")
          + (f"  draft={out['draft']}" if out["draft"] else "") + f"  transport={out['transport']}")
    rows = [("request", "prompt", "tokens", "TTFT ms", "TPOT ms", "text")]
    for r in out["requests"]:
        rows.append((str(r["request"]), str(r["prompt_tokens"]), str(r["new_tokens"]), f"{r['ttft_ms']:.1f}",
                     "" if r["tpot_ms"] is None else f"{r['tpot_ms']:.2f}", repr(_text(r["tokens"]))[:40]))
    print(align(rows, left=(5,)))
    acc = "" if out["acceptance_rate"] is None else \
        f"  acceptance {out['acceptance_rate']:.3f} ({out['accepted']}/{out['accepted'] + out['rejected']})"
    print(f"throughput {out['tokens_per_s']:.1f} tokens/s  TTFT p50 {out['ttft_p50_ms']:.1f} ms  p90 "
          f"{out['ttft_p90_ms']:.1f} ms  TPOT p50 {out['tpot_p50_ms']:.2f} ms  p90 {out['tpot_p90_ms']:.2f} ms  "
          f"bubble {out['bubble_ratio']:.3f}  waste {out['waste_ratio']:.3f}" + acc)
    if "matches_reference" in out:
        print("lossless: " + ("every request's tokens equal its AR greedy reference" if out["matches_reference"]
                              else "MISMATCH against the AR greedy reference"))
    if trace_dir:
        print(f"trace: {trace_dir}/rank<k>.jsonl, {trace_dir}/requests.csv, {trace_dir}/timeline.json")
