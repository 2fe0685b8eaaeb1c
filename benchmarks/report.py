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
        if set(pair) != {"fused", "eager"}:
            continue
        fused, eager = pair["fused"]["stats"]["median"], pair["eager"]["stats"]["median"]
        gbps = pair["fused"]["extra_info"]["bytes"] / fused / 1e9
        print(f"| {group} | {fused * 1e3:.3f} | {eager * 1e3:.3f} | {eager / fused:.2f}x | {gbps:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
