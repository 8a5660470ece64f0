"""Per-stage cost of the paper's backbones at their official input sizes (random weights: the
cost does not depend on the weights' values).

Stages, each in its own process so that its peak memory is its own:

* ``register``: multiGradICON at 175^3 on a CT/MR pair of realistic size (preprocessing, one
  forward pass, building the transform, warping the support mask onto the 1.5 mm working grid);
  for comparison, icon_registration's own ITK transform build and ITK warp of the same result;
* ``encode``: SAM-Med3D image encoder on one 128^3 window: the unmodified medim module and the
  exact fast path (and their largest difference);
* ``fuse``: semantic prior (300 prototypes) + features to window + entropy-gate fusion on one
  128^3 window;
* ``decode``: SAM-Med3D prompt encoder + mask decoder on one window (dense prompt, upsampling).

Usage::

    PYTHONPATH=. python benchmarks/bench_backbones.py            # all stages, prints a table
    PYTHONPATH=. python benchmarks/bench_backbones.py --stages encode decode --no-itk

Figures: wall seconds and CPU seconds (user + system of the process, all threads) of the stage
itself, and the process's peak resident memory (ru_maxrss) before and after the stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = _cpu() - self.cpu0
        return False


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pair():
    """A CT support (0.8 x 0.8 x 2.5 mm, 400 x 400 x 120) and an MR query (1.6 x 1.6 x 4 mm,
    224 x 224 x 72) with one organ each: sizes of abdominal scans."""
    from spasem.core.volume import Volume

    rng = np.random.default_rng(0)

    def scan(shape, spacing, modality):
        idx = np.indices(shape, dtype=np.float32)
        centre = (np.asarray(shape) - 1) / 2
        body = (((idx - centre[:, None, None, None]) / (np.asarray(shape) * 0.45)[:, None, None, None]) ** 2).sum(0) <= 1
        organ = np.zeros(shape, np.uint8)
        lo = (np.asarray(shape) * 0.3).astype(int)
        hi = (np.asarray(shape) * 0.6).astype(int)
        organ[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        if modality == "CT":
            image = np.where(body, 40.0, -1000.0).astype(np.float32)
            image[organ > 0] = 110.0
        else:
            image = np.where(body, 300.0, 0.0).astype(np.float32)
            image[organ > 0] = 650.0
        image += rng.normal(0, 10, shape).astype(np.float32)
        origin = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
        return (Volume.from_array(image, spacing=spacing, origin=origin, modality=modality),
                Volume.from_array(organ, spacing=spacing, origin=origin, is_label=True))

    support, mask = scan((400, 400, 120), (0.8, 0.8, 2.5), "CT")
    query, _ = scan((224, 224, 72), (1.6, 1.6, 4.0), "MR")
    return support, mask, query


def stage_register(args) -> dict:
    import torch

    from spasem.core.resample import resample
    from spasem.core.volume import Volume
    from spasem.models import gradicon as G

    shape = (args.input_shape,) * 3
    support, mask, query = _pair()
    net = G.build_network(shape).eval()
    rss_before = peak_rss_mb()
    out: dict = {"input_shape": f"{shape[0]}^3"}
    with Clock() as total:
        with Clock() as prep:
            s_box, q_box = G.network_boxes(support.grid, query.grid, shape, "common")
            moving = resample(G.normalise(support, "CT"), s_box, fill=0.0)
            fixed = resample(G.normalise(query, "MR"), q_box, fill=0.0)
            a, b = G.to_network(moving.array, torch.device("cpu")), G.to_network(fixed.array, torch.device("cpu"))
        with Clock() as forward:
            disp = G.predict_displacement(net, a, b)
        with Clock() as build:
            transform = G.make_transform(disp, q_box, s_box)
        work = query.grid.canonical(1.5)
        with Clock() as warp:
            soft = Volume(mask.array.astype(np.float32), mask.grid)
            warped = resample(soft, work, transform=transform)
    out.update(wall=total.wall, cpu=total.cpu, rss_before=rss_before, rss_peak=peak_rss_mb(),
               detail=f"prep {prep.wall:.1f}s, forward {forward.wall:.1f}s, transform {build.wall:.2f}s, "
                      f"warp {warp.wall:.2f}s onto {'x'.join(map(str, work.shape))}")
    if args.itk:
        import itk
        from icon_registration.itk_wrapper import create_itk_transform

        regis = net.regis_net
        # the same displacement as a network map [1, 3, K, J, I] in [0, 1] coordinates
        sides = torch.tensor(regis.identity_map.shape[2:], dtype=torch.float32)
        net_disp = torch.from_numpy(np.ascontiguousarray(disp[::-1].transpose(0, 3, 2, 1), dtype=np.float32))
        field = regis.identity_map + (net_disp / (sides - 1)[:, None, None, None])[None]

        def itk_image(box):
            image = itk.image_from_array(np.zeros(box.shape[::-1], np.float32))
            image.SetSpacing(box.spacing.tolist())
            image.SetOrigin(box.origin.tolist())
            image.SetDirection(itk.matrix_from_array(box.direction.copy()))
            return image
        s_img, q_img = itk_image(s_box), itk_image(q_box)
        with Clock() as itk_build:
            itk_transform = create_itk_transform(field, regis.identity_map, s_img, q_img)
        moving_mask = itk.image_from_array(np.ascontiguousarray(mask.array.transpose(2, 1, 0).astype(np.float32)))
        moving_mask.SetSpacing(mask.grid.spacing.tolist())
        moving_mask.SetOrigin(mask.grid.origin.tolist())
        moving_mask.SetDirection(itk.matrix_from_array(mask.grid.direction.copy()))
        reference = itk.image_from_array(np.zeros(work.shape[::-1], np.float32))
        reference.SetSpacing(work.spacing.tolist())
        reference.SetOrigin(work.origin.tolist())
        reference.SetDirection(itk.matrix_from_array(work.direction.copy()))
        with Clock() as itk_warp:
            itk.resample_image_filter(moving_mask, transform=itk_transform,
                                      interpolator=itk.LinearInterpolateImageFunction.New(moving_mask),
                                      use_reference_image=True, reference_image=reference)
        out["detail"] += f"; icon/ITK path: transform {itk_build.wall:.1f}s, warp {itk_warp.wall:.1f}s"
    del warped
    return out


def _window(rng):
    from spasem.core.volume import RAS_DIRECTION, Grid, Volume

    grid = Grid((128, 128, 128), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), RAS_DIRECTION)
    return Volume(rng.normal(50, 40, (128, 128, 128)).astype(np.float32), grid)


def stage_encode(args) -> dict:
    import torch

    from spasem.core.windows import zscore
    from spasem.models import sam_med3d as S

    torch.manual_seed(0)
    model = S.build_model().eval().requires_grad_(False)
    window = _window(np.random.default_rng(0))
    x = torch.from_numpy(zscore(window.array, window.array > 0))[None, None]
    with torch.no_grad():
        S.encoder_forward(model.image_encoder, x, fast=True)  # warm-up
        rss_before = peak_rss_mb()
        with Clock() as fast:
            a = S.encoder_forward(model.image_encoder, x, fast=True)
        with Clock() as ref:
            b = model.image_encoder(x)
    return {"wall": fast.wall, "cpu": fast.cpu, "rss_before": rss_before, "rss_peak": peak_rss_mb(),
            "detail": f"fast path {fast.wall:.1f}s vs medim module {ref.wall:.1f}s ({ref.wall / fast.wall:.1f}x), "
                      f"max |diff| {float((a - b).abs().max()):.1e}"}


def stage_fuse(args) -> dict:
    import torch

    from spasem.core.backends import Features
    from spasem.core.pipeline import features_to_window
    from spasem.core.priors import semantic_prior, spatial_prior
    from spasem.plugins.fusion.builtin import EntropyGateFusion

    rng = np.random.default_rng(0)
    window = _window(rng)
    feats = Features(torch.randn(384, 8, 8, 8), window.grid.scaled(16), window.grid)
    protos = torch.randn(300, 384)
    mask = torch.zeros(128, 128, 128)
    mask[30:100, 25:95, 40:90] = 1
    fusion = EntropyGateFusion()
    rss_before = peak_rss_mb()
    with Clock() as clock:
        p_reg = spatial_prior(mask, 2.0)
        p_sim_f, entropy_f = semantic_prior(feats.data, protos, 0.1, 0.07)
        p_sim = features_to_window(p_sim_f, feats)
        entropy = features_to_window(entropy_f, feats)
        fusion.fuse(p_reg, p_sim, entropy)
    return {"wall": clock.wall, "cpu": clock.cpu, "rss_before": rss_before, "rss_peak": peak_rss_mb(),
            "detail": "spatial prior + P_sim/H from 300 prototypes + trilinear to 128^3 + entropy gate"}


def stage_decode(args) -> dict:
    import torch
    import torch.nn.functional as F

    from spasem.models import sam_med3d as S

    torch.manual_seed(0)
    model = S.build_model().eval().requires_grad_(False)
    embedding = torch.randn(1, 384, 8, 8, 8)
    logits = torch.full((128, 128, 128), -10.0)
    logits[30:100, 25:95, 40:90] = 10.0
    with torch.no_grad():
        S.decode_dense_prompt(model, embedding, S.window_prompt(logits, 20.0))  # warm-up
        rss_before = peak_rss_mb()
        with Clock() as clock:
            low = S.decode_dense_prompt(model, embedding, S.window_prompt(logits, 20.0))
            F.interpolate(low, size=(128, 128, 128), mode="trilinear", align_corners=False)
    return {"wall": clock.wall, "cpu": clock.cpu, "rss_before": rss_before, "rss_peak": peak_rss_mb(),
            "detail": "dense prompt 32^3 -> mask decoder -> trilinear 128^3"}


STAGES = {"register": stage_register, "encode": stage_encode, "fuse": stage_fuse, "decode": stage_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--input-shape", type=int, default=175, help="GradICON network side (official 175)")
    parser.add_argument("--no-itk", dest="itk", action="store_false", help="skip the icon_registration/ITK comparison")
    parser.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(STAGES[args.child](args)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'stage':9s} {'wall s':>7s} {'CPU s':>7s} {'RSS before':>11s} {'peak RSS':>9s}  details")
    for name in args.stages:
        cmd = [sys.executable, __file__, "--child", name, "--input-shape", str(args.input_shape)]
        if not args.itk:
            cmd.append("--no-itk")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{name:9s} failed:\n{done.stderr[-2000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:9s} {row['wall']:7.2f} {row['cpu']:7.2f} {row['rss_before']:8.0f} MB {row['rss_peak']:6.0f} MB  {row['detail']}",
              flush=True)


if __name__ == "__main__":
    main()
