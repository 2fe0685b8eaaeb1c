"""Does S_pri predict the inversion attack's PSNR on digits? (ATS Fig. 2: Pearson 0.697 on CIFAR-100.)

For the identity and ``--policies`` distinct random policies: S_pri of 20 training digits on a
model semi-trained as in ATS (10% of the data, 50 epochs), and the PSNR / SSIM of Adam+Cosine
inverting 8 transformed digits' single-example gradients on a model trained on all the data (the
same model for every policy, unlike ATS, which trains one per policy). Prints one row per policy
and the correlations of S_pri with PSNR and with SSIM.

    OMP_NUM_THREADS=1 python benchmarks/ats_spri_psnr.py --size 16 --policies 60
"""

import argparse

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from tqdm import tqdm

from privfast.attacks.reconstruction import per_example_gradients, psnr, reconstruct, ssim
from privfast.attacks.training import train_classifier
from privfast.augment.ats_library import Policy, random_policy
from privfast.data import load_digits
from privfast.models import ConvNet
from privfast.search import privacy_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16, help="image side (8: the raw digits)")
    parser.add_argument("--width", type=int, default=16, help="ConvNet width")
    parser.add_argument("--policies", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=300, help="attack iterations (ATS Fig. 2: 2,500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    (x, y), _ = load_digits(size=args.size)
    semi = ConvNet(width=args.width, image_size=args.size)
    subset = torch.randperm(len(x), generator=generator)[: len(x) // 10]
    train_classifier(semi, x[subset], y[subset], epochs=50, generator=generator)
    trained = train_classifier(
        ConvNet(width=args.width, image_size=args.size), x, y, epochs=10, generator=generator
    ).eval()
    scored = torch.randperm(len(x), generator=generator)[:20]
    attacked = scored[:8]
    start = torch.rand(x[scored].shape, generator=generator)

    policies: list[Policy] = [Policy("")]
    while len(policies) < args.policies + 1:
        policy = random_policy(3, generator=generator)
        if policy not in policies:
            policies.append(policy)

    rows = []
    for policy in tqdm(policies, desc="policies"):
        s_pri = privacy_score(
            semi, x[scored], y[scored], policy=policy, start=start, generator=torch.Generator().manual_seed(1)
        ).mean()
        target = policy(x[attacked], generator=torch.Generator().manual_seed(2))
        shared = per_example_gradients(trained, target, y[attacked])
        rec = reconstruct(
            trained,
            shared,
            y[attacked],
            shape=target.shape[1:],
            config="adam_cosine",
            iterations=args.iterations,
            tv=0.0,
            generator=torch.Generator().manual_seed(3),
            progress=False,
        )
        rows.append(
            (
                str(policy) or "none",
                float(s_pri),
                float(psnr(rec.images, target).mean()),
                float(ssim(rec.images, target).mean()),
            )
        )

    print(f"{'policy':<12} {'S_pri':>6} {'PSNR':>6} {'SSIM':>6}")
    for name, s_pri, p, s in sorted(rows, key=lambda r: r[1]):
        print(f"{name:<12} {s_pri:6.3f} {p:6.2f} {s:6.3f}")
    table = np.array([r[1:] for r in rows])
    for column, metric in ((1, "PSNR"), (2, "SSIM")):
        print(
            f"S_pri vs {metric}: Pearson {pearsonr(table[:, 0], table[:, column])[0]:+.3f}, "
            f"Spearman {spearmanr(table[:, 0], table[:, column])[0]:+.3f} over {len(rows)} policies"
        )


if __name__ == "__main__":
    main()
