"""How much VAPAL's vectors differ between examples: the table behind the default representation (DESIGN §7).

    python -m benchmarks.vap_spread            # 2- and 6-label random-weight BERT, 64 examples, hidden 32

For each (labels, point, representation): the top singular values of the row-normalised vectors (one large
value and the rest near 0 means they are collinear: k-means++ then sees magnitudes only), the mean |cos|
between distinct examples, and the share of vectors on the + side of the top singular direction (0.50 with a
coin-flip sign). Every vector is scaled by its KL, as VAPAL clusters them.
"""
from __future__ import annotations

import argparse

import torch

from epa_kernels.active import vap_embeddings


def tiny_classifier(num_labels: int, hidden: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * hidden, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def random_pool(n: int, length: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=generator)
    lengths = torch.randint(4, length + 1, (n,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def spread(vectors: torch.Tensor) -> dict:
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    n = len(unit)
    cos = (unit @ unit.T).abs()
    _, values, right = torch.linalg.svd(unit, full_matrices=False)
    return {"singular": values[:4].tolist(), "mean_abs_cos": ((cos.sum() - n) / (n * (n - 1))).item(),
            "plus_share": (unit @ right[0] > 0).double().mean().item()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pool = random_pool(args.examples, 16, args.seed)
    rows = []
    print("| labels | point | representation | top singular values | mean \\|cos\\| | share with + sign |")
    print("|---:|---|---|---|---:|---:|")
    for labels in (2, 6):
        model = tiny_classifier(labels, args.hidden, args.seed)
        for point in ("pooled", "embeddings"):
            for representation in ("direction", "outer"):
                vectors = vap_embeddings(model, pool, point=point, representation=representation, scale_by_kl=True,
                                         seed=args.seed, progress=False)
                row = {"labels": labels, "point": point, "representation": representation, **spread(vectors)}
                rows.append(row)
                values = ", ".join(f"{v:.2f}" for v in row["singular"])
                print(f"| {labels} | {point} | {representation} | {values} | {row['mean_abs_cos']:.3f} "
                      f"| {row['plus_share']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
