"""What an honest-but-curious server learns from split-learning messages, with and without site DP.

    python benchmarks/privacy_attacks.py --out FILE.json [--quick]

1. Label leakage (Li et al., ICLR 2022). A binary, imbalanced site (phantom task ``oct_edema``,
   ~1/3 positive) trains a tiny-Swin split model for a few dozen steps. On held-out batches we then
   collect exactly the feature gradients the site would send: per-sample dF = d loss_i / dF, taken
   as the gradient of the SUM of per-sample losses w.r.t. the detached backbone features (no layer
   mixes samples, so this is each sample's own gradient; the site's mean-reduced message is the same
   up to the factor 1/B). Attacks: norm (score ||dF||, a-priori sign: larger = positive/minority;
   no max(AUC, 1-AUC)) and direction (cosine with one reference sample of known label, sign from
   that label; the reference excluded). Then the same with ``LabelDP(C = median ||dF||, sigma)``.
2. Reconstruction. A fundus site (``macular_edema``) is trained the same way; its TRAINED embedding
   maps fundus phantoms to z. The attacker has auxiliary phantoms (disjoint seeds) and the same
   embedding, trains a conv decoder z -> x, and is scored by SSIM on held-out phantoms. With
   ``GaussianActivationDP(C = median ||z||, sigma)`` the attacker trains on freshly noised z too.
   Baseline: predicting the mean auxiliary image.

Writes JSON (headline keys ``label_leak_auc_no_dp``, ``label_leak_auc_dp``,
``reconstruction_ssim_no_dp``, ``reconstruction_ssim_dp``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedbone_med.config import BackboneConfig, DataConfig, ModelConfig, SiteConfig, TaskConfig, TrainConfig
from fedbone_med.data.phantoms import make_fundus
from fedbone_med.data.sources import load_site_data
from fedbone_med.models import CutSpec, build_backbone, build_site_model
from fedbone_med.privacy import GaussianActivationDP, LabelDP
from fedbone_med.privacy.attacks import (
    auc_null_std,
    direction_attack_auc,
    label_auc,
    mean_image_baseline,
    norm_attack_auc,
    norm_attack_scores,
    reconstruct,
    ssim,
    train_inversion_decoder,
)

TINY_BACKBONE = BackboneConfig(
    name="swin-tiny", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4
)
CLS2 = TaskConfig(type="classification", num_classes=2)


def make_site(task: str, modality: str, size: int, n_train: int, n_val: int, batch: int) -> SiteConfig:
    return SiteConfig(
        name=f"attack-{task}",
        modality=modality,  # type: ignore[arg-type]
        data=DataConfig(task=task, image_size=size, n_train=n_train, n_val=n_val),
        task=CLS2,
        model=ModelConfig(head="classification", adapt_dim=16, adapt_heads=2),
        train=TrainConfig(batch_size=batch),
    )


def train_split(cfg: SiteConfig, steps: int, seed: int, lr: float = 1e-3):
    """Train site + backbone (in one process) on the site's phantom data; return models and data."""
    torch.manual_seed(seed)
    backbone = build_backbone(TINY_BACKBONE)
    site = build_site_model(cfg, CutSpec.of(backbone))
    data = load_site_data(cfg)
    params = list(site.parameters()) + list(backbone.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, b = len(data.train), cfg.train.batch_size
    losses = []
    site.train()
    backbone.train()
    for _ in range(steps):
        x, y = data.train.batch(torch.randint(0, n, (b,), generator=gen))
        z = site.embed(x)
        logits = site.top(backbone(z), z, (x.shape[-2], x.shape[-1]))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return site, backbone, data, losses


def collect_feature_grads(site, backbone, split, batch: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample dF (list of maps, each (N, C_i, H_i, W_i)) exactly as the site computes them, labels, probs."""
    maps: list[list[torch.Tensor]] = []
    labels, probs = [], []
    for i in range(0, len(split), batch):
        x, y = split.images[i : i + batch], split.targets[i : i + batch]
        with torch.no_grad():
            z = site.embed(x)
            feats = backbone(z)
        # The site's side of the cut: F arrives from the server, the site computes d loss / dF.
        f_in = [f.detach().requires_grad_(True) for f in feats]
        logits = site.top(f_in, z, (x.shape[-2], x.shape[-1]))
        loss = F.cross_entropy(logits, y, reduction="sum")  # sum -> each sample's own gradient
        grads = torch.autograd.grad(loss, f_in)
        maps.append([g.detach() for g in grads])
        labels.append(y)
        probs.append(torch.softmax(logits.detach(), dim=1)[:, 1])
    return [torch.cat([m[j] for m in maps]) for j in range(len(maps[0]))], torch.cat(labels), torch.cat(probs)


def label_attacks(dF: list[torch.Tensor], y: torch.Tensor, ref: int) -> dict:
    return {
        "norm_auc": norm_attack_auc(dF, y),
        "direction_auc": direction_attack_auc(dF, y, ref),
    }


def fundus_images(seeds: range, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([make_fundus(s, size).image.transpose(2, 0, 1) for s in seeds]).astype(np.float32))


@torch.no_grad()
def embed_all(site, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    site.eval()
    return torch.cat([site.embed(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def save_figure(path: Path, x: torch.Tensor, rec: torch.Tensor, rec_dp: torch.Tensor, k: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.2))
    rows = (("original", x), ("recon, no DP", rec), ("recon, activation DP", rec_dp))
    for r, (name, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="smaller everything (smoke test)")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    q = args.quick
    sigma, seed = args.sigma, args.seed
    settings = {
        "sigma": sigma,
        "seed": seed,
        "label_task": "oct_edema",
        "label_image_size": 32,
        "label_n_train": 128 if q else 256,
        "label_n_heldout": 128 if q else 384,
        "label_dp_draws": 5 if q else 20,
        "recon_task": "macular_edema",
        "recon_image_size": 32,
        "site_train_steps": 15 if q else 40,
        "batch_size": 16,
        "recon_n_aux": 256 if q else 512,
        "recon_n_test": 64 if q else 128,
        "decoder_steps": 150 if q else 1500,
        "decoder_batch": 32,
        "decoder_width": 32 if q else 48,
        "backbone": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4},
        "site_embedding": "trained (conv-stem, stride 2) of the macular_edema site after site_train_steps",
    }
    s = settings

    # ---- 1. label leakage -------------------------------------------------------------------
    cfg = make_site(
        "oct_edema", "oct", s["label_image_size"], s["label_n_train"], s["label_n_heldout"], s["batch_size"]
    )
    site, backbone, data, losses = train_split(cfg, s["site_train_steps"], seed)
    dF, y, p = collect_feature_grads(site, backbone, data.val, s["batch_size"])
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    ref = int(torch.nonzero(y == 1)[0])  # one positive whose label the attacker knows
    norms = norm_attack_scores(dF)
    clip_c = float(norms.median())
    no_dp = label_attacks(dF, y, ref)
    # LabelDP is applied per message (batch of B) as the site would; repeated over independent noise
    # draws so that the reported AUC is not one draw's luck (each draw is one full release of dF).
    draws = []
    for r in range(int(s["label_dp_draws"])):
        mech = LabelDP(clip_norm=clip_c, noise_multiplier=sigma, generator=torch.Generator().manual_seed(seed + 1 + r))
        noised: list[list[torch.Tensor]] = []
        for i in range(0, y.shape[0], s["batch_size"]):
            noised.append(mech.apply([m[i : i + s["batch_size"]] for m in dF]))
        draws.append(label_attacks([torch.cat([b[j] for b in noised]) for j in range(len(dF))], y, ref))
    dp = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    dp_std = {k: float(np.std([d[k] for d in draws])) for k in draws[0]}
    clip_only = label_attacks(mech.clip(dF), y, ref)
    label = {
        "n_heldout": int(y.shape[0]),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "auc_null_std": auc_null_std(n_pos, n_neg),
        "dF_shapes": [list(m.shape[1:]) for m in dF],
        "clip_norm": clip_c,
        "dF_norm_mean_pos": float(norms[y == 1].mean()),
        "dF_norm_mean_neg": float(norms[y == 0].mean()),
        "site_final_train_loss": float(np.mean(losses[-5:])),
        "site_heldout_task_auc": label_auc(p, y),
        "no_dp": no_dp,
        "clip_only": clip_only,
        "label_dp": dp,
        "label_dp_std_over_draws": dp_std,
        "label_dp_first_draw": draws[0],
        "label_dp_headline": "mean AUC over label_dp_draws independent noise draws; max over the two attacks "
        "is biased slightly above 0.5 under the null",
        "reference_index": ref,
        "auc_convention": "norm: larger ||dF|| predicts positive (minority) a priori; direction: sign from the "
        "reference's known label; no max(AUC, 1-AUC)",
    }

    # ---- 2. reconstruction -------------------------------------------------------------------
    rcfg = make_site("macular_edema", "fundus", s["recon_image_size"], 256, 16, s["batch_size"])
    rsite, _, _, rlosses = train_split(rcfg, s["site_train_steps"], seed + 10)
    x_aux = fundus_images(range(50_000_000, 50_000_000 + s["recon_n_aux"]), s["recon_image_size"])
    x_test = fundus_images(range(60_000_000, 60_000_000 + s["recon_n_test"]), s["recon_image_size"])
    z_aux, z_test = embed_all(rsite, x_aux), embed_all(rsite, x_test)
    z_c = float(z_aux.flatten(1).norm(dim=1).median())
    dec_b, dec_w = int(s["decoder_batch"]), int(s["decoder_width"])
    t1 = time.time()
    dec = train_inversion_decoder(z_aux, x_aux, s["decoder_steps"], batch_size=dec_b, width=dec_w, seed=seed)
    rec = reconstruct(dec, z_test)
    amech = GaussianActivationDP(
        clip_norm=z_c, noise_multiplier=sigma, generator=torch.Generator().manual_seed(seed + 2)
    )
    dec_dp = train_inversion_decoder(
        z_aux, x_aux, s["decoder_steps"], batch_size=dec_b, width=dec_w, seed=seed, z_transform=amech.apply
    )
    rec_dp = reconstruct(dec_dp, amech.apply(z_test))
    recon = {
        "z_shape": list(z_aux.shape[1:]),
        "clip_norm": z_c,
        "decoder_train_seconds": time.time() - t1,
        "site_final_train_loss": float(np.mean(rlosses[-5:])),
        "ssim_no_dp": ssim(rec, x_test),
        "ssim_dp": ssim(rec_dp, x_test),
        "ssim_mean_image_baseline": mean_image_baseline(x_aux, x_test),
        "ssim_win_size": 7,
    }
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(png, x_test, rec, rec_dp)

    result = {
        "label_leak_auc_no_dp": max(no_dp.values()),
        "label_leak_auc_no_dp_norm": no_dp["norm_auc"],
        "label_leak_auc_no_dp_direction": no_dp["direction_auc"],
        "label_leak_auc_dp": max(dp.values()),
        "label_leak_auc_dp_norm": dp["norm_auc"],
        "label_leak_auc_dp_direction": dp["direction_auc"],
        "reconstruction_ssim_no_dp": recon["ssim_no_dp"],
        "reconstruction_ssim_dp": recon["ssim_dp"],
        "reconstruction_ssim_mean_image_baseline": recon["ssim_mean_image_baseline"],
        "label": label,
        "reconstruction": recon,
        "settings": settings,
        "figure": str(png),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "wall_seconds": time.time() - t0,
        "quick": q,
    }
    args.out.write_text(json.dumps(result, indent=2))

    print(f"label leakage: {s['label_task']} held-out n={y.shape[0]} (pos {n_pos}), sigma={sigma}, C={clip_c:.3g}")
    print(f"  null AUC std ~ {label['auc_null_std']:.3f}; site held-out task AUC {label['site_heldout_task_auc']:.3f}")
    print(f"  {'attack':<12}{'no DP':>10}{'clip only':>12}{'LabelDP mean+-std':>20}")
    for k, name in (("norm_auc", "norm"), ("direction_auc", "direction")):
        print(f"  {name:<12}{no_dp[k]:>10.3f}{clip_only[k]:>12.3f}{dp[k]:>13.3f} +- {dp_std[k]:.3f}")
    print(f"reconstruction: fundus {s['recon_image_size']} px, trained embedding, z {recon['z_shape']}, C={z_c:.3g}")
    print(f"  {'setting':<26}{'SSIM':>8}")
    print(f"  {'mean-image baseline':<26}{recon['ssim_mean_image_baseline']:>8.3f}")
    print(f"  {'decoder, no DP':<26}{recon['ssim_no_dp']:>8.3f}")
    print(f"  {'decoder, activation DP':<26}{recon['ssim_dp']:>8.3f}")
    print(f"wrote {args.out} and {png} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
