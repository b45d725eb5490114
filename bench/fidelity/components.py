"""Component A/B: one piece of MMT at a time, the official code against fastmmt, same inputs.

    python bench/fidelity/components.py --official /path/to/MMT step    --init A.pth.tar B.pth.tar
    python bench/fidelity/components.py --official /path/to/MMT kmeans  --init A.pth.tar B.pth.tar
    python bench/fidelity/components.py --official /path/to/MMT kmeans-parts --init A.pth.tar B.pth.tar
    python bench/fidelity/components.py --official /path/to/MMT sampler --init A.pth.tar B.pth.tar
    python bench/fidelity/components.py --official /path/to/MMT augment
    python bench/fidelity/components.py --official /path/to/MMT features --init A.pth.tar B.pth.tar

``--data`` is the data folder ``side_by_side.py`` lays out (``WORK/data``); ``--init`` two official
source models (``WORK/pretrain/seed{1,2}/model_best.pth.tar``). Each command prints its numbers;
docs/fidelity.md records them with the command that produced them.

- ``step``: identical networks, centroids and batches through the official ``MMTTrainer`` and
  fastmmt's ``mmt_step`` for a few iterations; the largest differences of the losses, the
  students' and teachers' parameters and the BN running statistics (float64 by default, so float
  rounding cannot explain a difference).
- ``features``: one official model file, the official evaluation features (its test transform,
  loader and ``extract_features``) against fastmmt's (the same file through ``--init``'s loader).
- ``kmeans``: the averaged teacher features of the target training set clustered by scikit-learn
  ``KMeans(k, random_state=seed, n_init=10)`` as the official code calls it, and by fastmmt's
  k-means (its defaults, 10 restarts at the default 100 iterations, the paper configs' 10 x 300
  with projected and full-space seeding): agreement (NMI, ARI), inertia, agreement with the true
  identities, seconds.
- ``kmeans-parts``: the same features through the k-means pieces one at a time: scikit-learn's and
  FAISS's Lloyd iterations from one k-means++ start (label agreement, iterations), fastmmt's and
  scikit-learn's k-means++ seeding (potential over 20 seeds), and the best-of-10 solutions of
  ``--seeds`` (pairwise NMI within each method and across the two, inertia, NMI to the true ids).
- ``sampler``: the official ``RandomMultipleGallerySampler`` and fastmmt's P x K planner over the
  same k-means pseudo-labels for one epoch: identities and images per batch, batches off the
  P x K grid, distinct images seen, cross-camera positives.
- ``augment``: the same images through the official torchvision transforms and fastmmt's
  ``TrainTransform``: mean/std of the batches, flip/erase rates, erased area.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_runner  # noqa: E402


def target_dataset(data: Path):
    from fastmmt.data import load_dataset

    return load_dataset("market1501", str(data / "market1501"))


def official_net(arch: str, k: int, state: dict):
    from mmt import models
    from mmt.utils.serialization import copy_state_dict
    from torch import nn

    net = nn.DataParallel(models.create(arch, num_features=0, dropout=0, num_classes=k))
    copy_state_dict(state, net)
    return net


def teacher_features(inits: list[str], data: Path, height: int, width: int) -> tuple[torch.Tensor, object]:
    """The averaged eval-mode features of the target training set from two fastmmt-loaded models."""
    from fastmmt.train.extraction import RunExtraction
    from fastmmt.train.model_file import load_model_file
    from fastmmt.train.options import ExperimentOptions

    opts = ExperimentOptions()
    opts.data.height, opts.data.width, opts.data.workers, opts.data.backend = height, width, 0, "torch"
    target = target_dataset(data)
    nets = [load_model_file(p, opts, torch.device("cpu")) for p in inits]
    ex = RunExtraction(target, opts.data, opts.run, opts.model, torch.device("cpu"), None)
    feats = [ex.features(n, "train", "extract") for n in nets]
    return torch.stack(feats).mean(0), target


def cmd_kmeans(a) -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from fastmmt.cluster import kmeans

    cf, target = teacher_features(a.init, a.data, a.height, a.width)
    x = cf.numpy().astype(np.float32)
    true = np.array([r.pid for r in target.train])
    print(f"{len(x)} features x {x.shape[1]}, k = {a.k}, seeds {a.seeds}")

    def inertia(labels):
        return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))

    runs = {}
    for seed in a.seeds:
        t0 = time.perf_counter()
        km = KMeans(n_clusters=a.k, random_state=seed, n_init=10).fit(x)  # the official call (n_jobs gone)
        runs[("sklearn n_init=10", seed)] = (km.labels_, time.perf_counter() - t0)
        variants = {"fastmmt 1x100 (default)": (1, 100, 256), "fastmmt 10x100 (default iters)": (10, 100, 256),
                    "fastmmt 10x300 (paper cfg)": (10, 300, 256), "fastmmt 10x300 full-space seed": (10, 300, None)}
        for name, (nredo, niter, seed_dim) in variants.items():
            t0 = time.perf_counter()
            res = kmeans(cf, a.k, seed=seed, nredo=nredo, niter=niter, seed_dim=seed_dim, num_threads=1)
            runs[(name, seed)] = (np.asarray(res.labels), time.perf_counter() - t0)
    ref = {s: runs[("sklearn n_init=10", s)][0] for s in a.seeds}
    print(f"{'method':<31}{'inertia':>10}{'NMI true':>10}{'ARI true':>10}{'NMI sk':>9}{'ARI sk':>9}{'s':>7}")
    for name in dict.fromkeys(n for n, _ in runs):
        rows = [(inertia(runs[(name, s)][0]), nmi(true, runs[(name, s)][0]), ari(true, runs[(name, s)][0]),
                 nmi(ref[s], runs[(name, s)][0]), ari(ref[s], runs[(name, s)][0]), runs[(name, s)][1]) for s in a.seeds]
        m, sd = np.mean(rows, 0), np.std(rows, 0, ddof=1) if len(rows) > 1 else np.zeros(6)
        print(f"{name:<31}{m[0]:10.2f}{m[1]:10.4f}{m[2]:10.4f}{m[3]:9.4f}{m[4]:9.4f}{m[5]:7.2f}")
        print(f"{'  sd over seeds':<31}{sd[0]:10.2f}{sd[1]:10.4f}{sd[2]:10.4f}{sd[3]:9.4f}{sd[4]:9.4f}")
    s0, s1 = a.seeds[0], a.seeds[-1]
    if s0 != s1:
        print(f"sklearn seed {s0} vs seed {s1}: NMI {nmi(ref[s0], ref[s1]):.4f} ARI {ari(ref[s0], ref[s1]):.4f} "
              "(the run-to-run agreement of the official clustering itself)")


def cmd_kmeans_parts(a) -> None:
    """The k-means pieces one at a time on the same features: Lloyd iterations from one start,
    the k-means++ seeding, and how alike the best-of-10 solutions of several seeds are."""
    import itertools

    import faiss
    from sklearn.cluster import KMeans, kmeans_plusplus
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from fastmmt.cluster import kmeans
    from fastmmt.cluster.kmeans import lloyd
    from fastmmt.cluster.seeding import kmeans_plusplus as fastmmt_plusplus

    cf, target = teacher_features(a.init, a.data, a.height, a.width)
    x = np.ascontiguousarray(cf.numpy(), dtype=np.float32)
    true = np.array([r.pid for r in target.train])
    faiss.omp_set_num_threads(1)
    print(f"{len(x)} features x {x.shape[1]}, k = {a.k}, seeds {a.seeds}")
    # 1. Lloyd from one start: scikit-learn's KMeans(init=...) and fastmmt's FAISS run (kmeans.lloyd)
    index = faiss.IndexFlatL2(x.shape[1])
    for seed in a.seeds:
        start = kmeans_plusplus(x, a.k, random_state=seed)[0]
        km = KMeans(a.k, init=start, n_init=1, max_iter=300).fit(x)
        clus = lloyd(x, a.k, seed, 300, start, index)
        index.reset()
        index.add(faiss.vector_float_to_array(clus.centroids).reshape(a.k, -1))
        labels = index.search(x, 1)[1][:, 0]
        print(f"same start, seed {seed}: labels equal {np.mean(labels == km.labels_):.4f}, NMI "
              f"{nmi(km.labels_, labels):.4f}, iterations scikit-learn {km.n_iter_} FAISS {clus.iteration_stats.size()}")

    # 2. the seeding alone: potential (sum of squared distances to the nearest seed)
    def potential(rows):
        c = x[rows]
        d = (x ** 2).sum(1)[:, None] + (c ** 2).sum(1)[None] - 2 * x @ c.T
        return float(d.min(1).clip(min=0).sum())

    seeds20 = range(a.seeds[0], a.seeds[0] + 20)
    ours = [potential(fastmmt_plusplus(cf, a.k, s, None).numpy()) for s in seeds20]
    theirs = [potential(kmeans_plusplus(x, a.k, random_state=s)[1]) for s in seeds20]
    print(f"k-means++ potential over 20 seeds: fastmmt {np.mean(ours):.3f} +- {np.std(ours, ddof=1):.3f}, "
          f"scikit-learn {np.mean(theirs):.3f} +- {np.std(theirs, ddof=1):.3f}")
    # 3. best of 10 restarts per seed: diversity within each method and agreement across the two
    ours = [kmeans(cf, a.k, seed=s, nredo=10, niter=300, seed_dim=None, backend="faiss", num_threads=1) for s in a.seeds]
    theirs = [KMeans(a.k, n_init=10, max_iter=300, random_state=s).fit(x) for s in a.seeds]
    within_f = [nmi(p.labels, q.labels) for p, q in itertools.combinations(ours, 2)]
    within_s = [nmi(p.labels_, q.labels_) for p, q in itertools.combinations(theirs, 2)]
    across = [nmi(p.labels, q.labels_) for p in ours for q in theirs]
    print(f"best of 10, pairwise NMI: within FAISS {np.mean(within_f):.4f}, within scikit-learn {np.mean(within_s):.4f}, "
          f"across {np.mean(across):.4f}")
    print(f"best of 10: inertia FAISS {np.mean([r.info['inertia'] for r in ours]):.4f}, scikit-learn "
          f"{np.mean([k.inertia_ for k in theirs]):.4f}; NMI to the true ids FAISS "
          f"{np.mean([nmi(true, r.labels) for r in ours]):.4f}, scikit-learn {np.mean([nmi(true, k.labels_) for k in theirs]):.4f}")


def cmd_sampler(a) -> None:
    from mmt.utils.data.sampler import RandomMultipleGallerySampler

    from fastmmt.cluster import kmeans
    from fastmmt.data.sampler import BatchPlanner

    cf, target = teacher_features(a.init, a.data, a.height, a.width)
    labels = np.asarray(kmeans(cf, a.k, seed=1, nredo=10, niter=300, num_threads=1).labels)
    cams = np.array([r.camid for r in target.train])
    sizes = Counter(labels.tolist())
    print(f"{len(labels)} images, k = {a.k}: cluster sizes min {min(sizes.values())} max {max(sizes.values())}, "
          f"singletons {sum(v == 1 for v in sizes.values())}, clusters in one camera only "
          f"{sum(len(set(cams[labels == c])) == 1 for c in sizes)}")
    b, kk, iters = a.batch, a.instances, a.iters

    def stats(batches: list[np.ndarray]) -> dict:
        ids = [len(set(labels[bt])) for bt in batches]
        off = 0
        for bt in batches:
            runs = bt.reshape(-1, kk) if len(bt) % kk == 0 else None
            off += int(runs is None or any(len(set(labels[r])) != 1 for r in runs))
        per_id = [Counter(labels[bt].tolist()) for bt in batches]
        singles = [sum(v == 1 for v in c.values()) for c in per_id]  # identities with no positive
        cross = []
        for bt in batches:
            for r in range(0, len(bt), kk):
                run = bt[r:r + kk]
                if len(set(labels[run])) == 1:
                    cross.append(np.mean(cams[run[1:]] != cams[run[0]]))
        seen = len(set(np.concatenate(batches).tolist()))
        return {"ids/batch": np.mean(ids), "ids/batch min": min(ids), "off-grid batches": off,
                "ids w/o positive/batch": np.mean(singles), "cross-cam positives": np.mean(cross),
                "distinct images": seen}

    # official: a fresh sampler pass per DataLoader epoch, batches of b with drop_last, IterLoader wraps
    train = [(r.path, int(l), r.camid) for r, l in zip(target.train, labels)]
    order = sorted(range(len(train)), key=lambda i: train[i])  # the official code trains on sorted(dataset.train)
    train_sorted = [train[i] for i in order]
    import random
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    sampler = RandomMultipleGallerySampler(train_sorted, kk)
    off_batches: list[np.ndarray] = []
    while len(off_batches) < iters:
        idx = np.array(list(iter(sampler)))
        idx = np.array(order)[idx]  # back to fastmmt's record order
        off_batches += [idx[i:i + b] for i in range(0, len(idx) - b + 1, b)]
    off_batches = off_batches[:iters]
    plan = BatchPlanner(labels, cams, b, kk, seed=1).global_plan(0, iters)
    fast_batches = list(plan.indices)
    so, sf = stats(off_batches), stats(fast_batches)
    print(f"{'per epoch of ' + str(iters) + ' batches of ' + str(b):<32}{'official':>12}{'fastmmt':>12}")
    for key in so:
        print(f"{key:<32}{so[key]:12.3f}{sf[key]:12.3f}")


def cmd_augment(a) -> None:
    from mmt.utils.data import transforms as T
    from PIL import Image

    from fastmmt.data.transforms import TrainTransform

    target = target_dataset(a.data)
    paths = [r.path for r in target.train][: a.images]
    imgs = [Image.open(p).convert("RGB") for p in paths]
    h, w = a.height, a.width
    official = T.Compose([T.Resize((h, w), interpolation=3), T.RandomHorizontalFlip(p=0.5), T.Pad(10),
                          T.RandomCrop((h, w)), T.ToTensor(),
                          T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
                          T.RandomErasing(probability=0.5, mean=[0.485, 0.456, 0.406])])
    fast = TrainTransform(h, w)
    torch.manual_seed(0)
    import random
    random.seed(0)
    gen = torch.Generator().manual_seed(0)
    reps = a.reps
    xo = torch.stack([official(im) for _ in range(reps) for im in imgs])
    xf = torch.stack([fast(im, gen) for _ in range(reps) for im in imgs])
    # the erased box holds exactly the fill values in every channel; the zero pad is -mean/std
    fill = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    pad = (-torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])).view(1, 3, 1, 1)

    def stats(x: torch.Tensor) -> dict:
        erased = (x == fill).all(1).float().mean((1, 2))
        padded = (x - pad).abs().lt(1e-5).all(1).float().mean((1, 2))
        return {"mean": x.mean().item(), "std": x.std().item(), "erased images": (erased > 0).float().mean().item(),
                "erased area (erased imgs)": erased[erased > 0].mean().item(),
                "padding area": padded.mean().item(),
                "per-channel mean R": x[:, 0].mean().item(), "per-channel mean B": x[:, 2].mean().item()}

    so, sf = stats(xo), stats(xf)
    print(f"{len(imgs)} target images x {reps} draws at {h}x{w}")
    print(f"{'':<28}{'official':>12}{'fastmmt':>12}")
    for key in so:
        print(f"{key:<28}{so[key]:12.4f}{sf[key]:12.4f}")


def cmd_features(a) -> None:
    """The same official model file: the official evaluation features vs fastmmt's (loader included)."""
    from mmt.evaluators import extract_features
    from mmt.utils.data import transforms as T
    from mmt.utils.data.preprocessor import Preprocessor
    from mmt.utils.serialization import load_checkpoint
    from torch.utils.data import DataLoader

    from fastmmt.train.extraction import RunExtraction
    from fastmmt.train.model_file import load_model_file
    from fastmmt.train.options import ExperimentOptions

    target = target_dataset(a.data)
    records = target.train[: a.images]
    state = load_checkpoint(a.init[0])["state_dict"]
    k = state["module.classifier.weight"].shape[0]
    net = official_net("resnet50", k, state)
    tf = T.Compose([T.Resize((a.height, a.width), interpolation=3), T.ToTensor(),
                    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    loader = DataLoader(Preprocessor([(r.path, r.pid, r.camid) for r in records], root=None, transform=tf),
                        batch_size=64, shuffle=False)
    fo = torch.stack(list(extract_features(net, loader, print_freq=10 ** 9)[0].values()))
    opts = ExperimentOptions()
    opts.data.height, opts.data.width, opts.data.workers, opts.data.backend = a.height, a.width, 0, "torch"
    fnet = load_model_file(a.init[0], opts, torch.device("cpu"))
    target.train = records
    ff = RunExtraction(target, opts.data, opts.run, opts.model, torch.device("cpu"), None).features(fnet, "train", "x")
    d = (fo - ff).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(fo, ff).min().item()
    print(f"{len(records)} images at {a.height}x{a.width}, {a.init[0]}: official vs fastmmt eval features "
          f"max |diff| {d:.2e}, min cosine {cos:.8f}")


def cmd_step(a) -> None:
    """One set of networks through both trainers for ``--steps`` iterations."""
    from mmt.trainers import MMTTrainer
    from mmt.utils.serialization import load_checkpoint
    from sklearn.preprocessing import normalize

    from fastmmt.data.loaders import TrainBatch
    from fastmmt.train.mean_teacher import MeanTeacher
    from fastmmt.train.mmt import _set_classifiers, mmt_step
    from fastmmt.train.model_file import load_model_file
    from fastmmt.train.options import ExperimentOptions
    from fastmmt.train.optim import adam
    from fastmmt.train.runtime import setup_run
    from fastmmt.train.update import StepContext

    torch.manual_seed(0)
    k, b = a.k, a.batch
    states = [load_checkpoint(p)["state_dict"] for p in a.init]
    cent = normalize(np.random.default_rng(0).standard_normal((k, 2048)).astype(np.float32), axis=1)
    # the classifier rows both codes start from: fastmmt re-normalises in float32 (_set_classifiers),
    # so give the official networks exactly those values
    cent_t = torch.nn.functional.normalize(torch.from_numpy(cent).float(), dim=1)
    # official networks
    m1, m2, t1, t2 = (official_net("resnet50", k, states[i]) for i in (0, 1, 0, 1))
    for m, t in ((m1, t1), (m2, t2)):
        t.module.classifier.weight.data.copy_(m.module.classifier.weight.data)
        for p in t.parameters():
            p.detach_()
    for net in (m1, m2, t1, t2):
        net.module.classifier.weight.data.copy_(cent_t)
    trainer = MMTTrainer(m1, m2, t1, t2, num_cluster=k, alpha=0.999)
    # fastmmt networks from the same files
    opts = ExperimentOptions()
    opts.run.device, opts.run.num_threads = "cpu", None
    opts.run.sync_each_step = True  # read every loss each step (the comparison reads them anyway)
    rt = setup_run(opts)
    students = [load_model_file(p, opts, torch.device("cpu")) for p in a.init]
    mean_teacher = MeanTeacher(students, 0.999)
    teachers = mean_teacher.teachers
    _set_classifiers(students, teachers, cent_t)
    dt = torch.float64 if a.float64 else torch.float32
    for net in (m1, m2, t1, t2, *students, *teachers):
        net.to(dt)
    params = [{"params": [v], "lr": a.lr, "weight_decay": 5e-4} for m in (m1, m2) for v in m.parameters()
              if v.requires_grad]
    opt_o = torch.optim.Adam(params)
    opt_f = adam(students, a.lr, 5e-4, "default")
    for n in students + teachers:
        n.train()
    gen = torch.Generator().manual_seed(1)
    p_ids = b // a.instances
    for step in range(a.steps):
        x1 = torch.randn(b, 3, a.height, a.width, generator=gen, dtype=torch.float64).to(dt)
        x2 = torch.randn(b, 3, a.height, a.width, generator=gen, dtype=torch.float64).to(dt)
        y = torch.randint(k, (p_ids,), generator=gen).repeat_interleave(a.instances)

        class One:
            def next(self):
                return x1, x2, y

            def __len__(self):
                return 1

        # the official trainer's step count is epoch * len(loader) + i: one call per step, epoch = step
        trainer.train(step, One(), opt_o, ce_soft_weight=0.5, tri_soft_weight=0.8, print_freq=1, train_iters=1)
        batch = TrainBatch((x1, x2), y, torch.zeros(b, dtype=torch.int64), torch.arange(b))
        out = mmt_step(StepContext(students, students, opt_f, opts, rt, mean_teacher), batch, step)

        print(f"step {step}: fastmmt loss {float(out['loss']):.6f}", flush=True)
        for name, om, fm in (("S1", m1, students[0]), ("S2", m2, students[1])):
            rel = sorted(((float((p.grad - q.grad).norm() / (p.grad.norm() + 1e-30)), n, float(p.grad.norm()))
                          for (n, q), p in zip(fm.named_parameters(), om.module.parameters())
                          if p.grad is not None and q.grad is not None), reverse=True)
            print(f"  {name} gradients, |g_official - g_fastmmt| / |g_official| largest: "
                  + ", ".join(f"{n} {d:.1e} (|g| {g:.1e})" for d, n, g in rel[:3]))
    # compare parameters by value order (both networks list parameters in the same module order)
    for name, (om, fm) in {"S1": (m1, students[0]), "S2": (m2, students[1]), "T1": (t1, teachers[0]),
                           "T2": (t2, teachers[1])}.items():
        po = [p.detach() for p in om.module.parameters()]
        names = [n for n, _ in fm.named_parameters()]
        pf = [p.detach() for p in fm.parameters()]
        rel = sorted(((float((p - q).abs().max() / (p.abs().max() + 1e-12)), n) for n, p, q in zip(names, po, pf)),
                     reverse=True)
        print(f"{name}: largest relative differences " + ", ".join(f"{n} {d:.1e}" for d, n in rel[:4]))
        bo = [x for n, x in om.module.named_buffers() if "running" in n]
        bf = [x for n, x in fm.named_buffers() if "running" in n]
        assert len(po) == len(pf) and len(bo) == len(bf), (len(po), len(pf), len(bo), len(bf))
        dp = max(float((p - q).abs().max() / (p.abs().max() + 1e-12)) for p, q in zip(po, pf) if p.shape == q.shape)
        db = max(float((p - q).abs().max() / (p.abs().max() + 1e-12)) for p, q in zip(bo, bf))
        print(f"{name}: largest parameter difference {dp:.2e}, BN running stats {db:.2e} (relative to each "
              f"tensor's largest entry) after {a.steps} steps")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True)
    p.add_argument("--data", type=Path, default=Path("runs/fidelity/data"))
    p.add_argument("--init", nargs=2, default=None)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--k", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--instances", type=int, default=4, help="sampler, step: images per identity (K)")
    p.add_argument("--iters", type=int, default=400, help="sampler: batches in the epoch")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--images", type=int, default=256, help="augment: images")
    p.add_argument("--reps", type=int, default=8, help="augment: draws per image")
    p.add_argument("--steps", type=int, default=3, help="step: iterations")
    p.add_argument("--lr", type=float, default=3.5e-4)
    p.add_argument("--float32", dest="float64", action="store_false",
                   help="step: float32 networks (default float64: rounding then cannot explain a difference)")
    p.add_argument("what", choices=["step", "kmeans", "kmeans-parts", "sampler", "augment", "features"])
    a = p.parse_args(argv)
    official_runner.setup(str(Path(a.official).resolve()))
    {"step": cmd_step, "features": cmd_features, "kmeans": cmd_kmeans, "kmeans-parts": cmd_kmeans_parts,
     "sampler": cmd_sampler, "augment": cmd_augment}[a.what](a)


if __name__ == "__main__":
    main()
