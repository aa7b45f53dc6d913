"""Print a markdown table of runs/experiments/*.jsonl (pretrain_knn.py's records)."""
import json
import statistics as st
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "runs" / "experiments"
print("| run | seed | step | steps/s | loss | eval | recal | fmnist |\n|---|---|---|---|---|---|---|---|")
for f in sorted(OUT.glob("*.jsonl")):
    for line in f.read_text().splitlines():
        r = json.loads(line)
        if "step" in r:
            k = r["knn"]
            print(f"| {f.stem} | {r['seed']} | {r['step']} | {r.get('steps_per_s', '')} | {r.get('loss', '')} "
                  f"| {k['eval']} | {k['recal']} | {k['fmnist']} |")
rand = [json.loads(line) for line in (OUT / "random.jsonl").read_text().splitlines()]
ri = [r for r in rand if r["what"] == "random_init"]
for m in ("eval", "recal", "fmnist"):
    v = [r["knn"][m] for r in ri]
    print(f"random init {m}: n={len(v)} mean {st.mean(v):.2f} sd {st.stdev(v):.2f} min {min(v)} max {max(v)}")
print("pixels:", [r["knn"] for r in rand if r["what"] == "pixels"])
