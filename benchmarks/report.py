"""Turn a pytest-benchmark JSON file into a Markdown table of fused vs eager, with ratios and GB/s.

python benchmarks/report.py bench_ops.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = bench["params"].get("impl")
        if impl:
            groups[bench["group"]][impl] = bench
    print(
        f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
        f"{data['machine_info'].get('cpu', {}).get('count', '?')} logical CPUs; torch threads as default.\n"
    )
    print("| case | fused (ms, median) | eager (ms, median) | eager / fused | fused GB/s |")
    print("|---|---:|---:|---:|---:|")
    for group in sorted(groups):
        pair = groups[group]
        if not {"fused", "eager"} <= set(pair):
            continue
        fused, eager = pair["fused"]["stats"]["median"], pair["eager"]["stats"]["median"]
        gbps = pair["fused"]["extra_info"]["bytes"] / fused / 1e9
        print(f"| {group} | {fused * 1e3:.3f} | {eager * 1e3:.3f} | {eager / fused:.2f}x | {gbps:.1f} |")
    floors = {g: pair for g, pair in groups.items() if "one read" in pair}
    if floors:
        print("\nLarge rows against one read of the same gradients (medians):\n")
        print("| case | fused / one read | fused (sigma = 0) / one read | eager / fused |")
        print("|---|---:|---:|---:|")
        for group in sorted(floors):
            pair = floors[group]
            read = pair["one read"]["stats"]["median"]
            fused, eager = pair["fused"]["stats"]["median"], pair["eager"]["stats"]["median"]
            quiet = pair["fused-sigma0"]["stats"]["median"]
            print(f"| {group} | {fused / read:.2f}x | {quiet / read:.2f}x | {eager / fused:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
