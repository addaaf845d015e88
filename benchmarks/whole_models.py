"""Whole models, tiled vs untiled: compiled temporaries and compile time, side by side.

    python benchmarks/whole_models.py             # examples/flax_unet.py's model at 2048x2048
    python benchmarks/whole_models.py --size 512  # smaller and faster
    python benchmarks/whole_models.py --time 3    # also run forward and gradient, 3 rounds
    python benchmarks/whole_models.py --model vae # examples/flax_vae_decoder.py, 256x256 latent
    python benchmarks/whole_models.py --model resnet  # examples/equinox_resnet.py, 2x3x1024x1024
    python benchmarks/whole_models.py --model haiku-resnet18  # 1x1024x1024x3, needs dm-haiku
    python benchmarks/whole_models.py --model haiku-resnet18 --training  # batch statistics
    python benchmarks/whole_models.py --model equinox-vae  # the VAE decoder in equinox, vmapped
    python benchmarks/whole_models.py --compile-rounds 3  # the fastest of 3 compiles of each
    python benchmarks/whole_models.py --size 1024 --remat  # each conv block in flax's nn.remat
    python benchmarks/whole_models.py --model convnext --max-bytes 4194304  # dense layers too

The gradient (with respect to the parameters, of the output's sum) is tiled two ways:
`jax.grad(tile_convs(f))` ("gradient, tiled") and `tile_convs(jax.grad(f))`, the program JAX has
already differentiated. The programs are lowered and compiled on shapes (`jax.ShapeDtypeStruct`),
and the temporaries are XLA's buffer assignment (`memory_analysis().temp_size_in_bytes`).
Compile time is split into tracing and lowering (jaxtile's rewrite runs there) and XLA's compile;
with `--compile-rounds N`, the fastest of N, each program in turn, so that a busy moment does not
count. With `--time N` the
untiled and the tiled forward, then the two gradients, also run on random inputs, N alternating
rounds after a warm-up each, and the median times are printed as a ratio.
"""

import argparse
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

import jaxtile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))


def _equinox_decoder(eqx, widths, groups):
  """examples/flax_vae_decoder.py's decoder written with equinox's layers (on one (C, H, W)
  latent): its GroupNorm normalises in the grouped shape, with a centred variance."""
  keys = iter(jax.random.split(jax.random.key(0), 64))
  conv = lambda i, o, k=3: eqx.nn.Conv2d(i, o, k, padding=k // 2, key=next(keys))

  class Block(eqx.Module):
    layers: tuple
    skip: object

    def __call__(self, x):
      n1, c1, n2, c2 = self.layers
      h = c2(jax.nn.silu(n2(c1(jax.nn.silu(n1(x))))))
      return (x if self.skip is None else self.skip(x)) + h

  class Decoder(eqx.Module):
    layers: tuple

    def __call__(self, z):
      x = self.layers[0](z)
      for layer in self.layers[1:-2]:
        if isinstance(layer, Block):
          x = layer(x)
        else:  # an upsampling by 2 and its conv
          c, h, w = x.shape
          x = layer(jax.image.resize(x, (c, 2 * h, 2 * w), method="nearest"))
      return self.layers[-1](jax.nn.silu(self.layers[-2](x)))

  layers, width = [conv(4, widths[0])], widths[0]
  for level, w in enumerate(widths):
    layers.append(Block((eqx.nn.GroupNorm(groups, width), conv(width, w),
                         eqx.nn.GroupNorm(groups, w), conv(w, w)),
                        None if width == w else conv(width, w, 1)))
    width = w
    if level + 1 < len(widths):
      layers.append(conv(w, w))
  layers += [eqx.nn.GroupNorm(groups, width), conv(width, 3)]
  return Decoder(tuple(layers))


def _convnext(nn, width=32, blocks=3):
  """A ConvNeXt-style stack in flax: a 4x4 stride-4 stem, then blocks of a 7x7 depthwise conv,
  a LayerNorm and an MLP of two `nn.Dense` layers on the features (width -> 4 width -> width)
  with a GELU between, added to the block's input."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(width, (7, 7), feature_group_count=width)(x)
      h = nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(h))))
      return x + h

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(width, (4, 4), strides=4)(x)
      for _ in range(blocks):
        x = Block()(x)
      return x

  return Net()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("unet", "vae", "resnet", "haiku-resnet18", "convnext",
                                          "equinox-vae"),
                      default="unet")
  parser.add_argument("--size", type=int, default=None,
                      help="image side (unet, default 2048; resnet, haiku-resnet18 and convnext, "
                           "1024) or latent side (vae and equinox-vae, default 256)")
  parser.add_argument("--max-bytes", type=int, default=16 * 2**20)
  parser.add_argument("--time", type=int, default=0, help="alternating timed rounds (0: none)")
  parser.add_argument("--compile-rounds", type=int, default=1,
                      help="lower and compile every program this many times, in turn, and "
                           "print the fastest of each (on a shared machine one compile can take "
                           "twice as long as the next)")
  parser.add_argument("--training", action="store_true",
                      help="haiku-resnet18 in training mode: batch norm with batch statistics")
  parser.add_argument("--remat", action="store_true",
                      help="unet and vae: each conv block (residual block) wrapped in flax's "
                           "nn.remat, as gradient checkpointing does")
  args = parser.parse_args(argv)
  if args.remat and args.model not in ("unet", "vae"):
    parser.error(f"--remat is for --model unet and vae, not {args.model}")
  logging.getLogger("absl").setLevel(logging.ERROR)
  # The examples, with their optional flax dependency.
  if args.model == "haiku-resnet18":
    try:
      import haiku as hk  # noqa: E402
    except ImportError:
      sys.exit("--model haiku-resnet18 needs dm-haiku: pip install dm-haiku")
    size = args.size or 1024
    net = hk.transform_with_state(
        lambda x, training: hk.nets.ResNet18(num_classes=10)(x, is_training=training))
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    init = lambda x: net.init(jax.random.key(0), x, True)
    params = jax.eval_shape(init, x)
    # Inference: batch norm with its moving averages (made by a training-mode init); with
    # --training, with the statistics of the batch.
    apply = lambda p, x: net.apply(*p, None, x, args.training)[0]
    label = (f"haiku ResNet18 ({'training mode' if args.training else 'inference'}) on "
             f"1x{size}x{size}x3")
  elif args.model == "equinox-vae":
    import equinox as eqx  # noqa: E402
    size = args.size or 256
    net = _equinox_decoder(eqx, (128, 64, 32), 32)
    real_params, static = eqx.partition(net, eqx.is_array)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), real_params)
    apply = lambda p, z: jax.vmap(eqx.combine(p, static))(z)
    init = lambda z: real_params
    x = jax.ShapeDtypeStruct((1, 4, size, size), jnp.float32)
    label = (f"equinox VAE decoder widths (128, 64, 32), GroupNorm(32), under vmap on a "
             f"1x4x{size}x{size} latent (image {4 * size}x{4 * size})")
  elif args.model == "resnet":
    import equinox as eqx  # noqa: E402
    import equinox_resnet  # noqa: E402
    size = args.size or 1024
    net = equinox_resnet.random_model(equinox_resnet.ResNet, 3, (32, 32, 64, 128),
                                      strides=(1, 1, 2, 2), n_classes=5)
    real_params, static = eqx.partition(net, eqx.is_array)  # the arrays: what grad sees
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), real_params)
    apply = lambda p, x: equinox_resnet.forward(eqx.combine(p, static), x)
    init = lambda x: real_params
    x = jax.ShapeDtypeStruct((2, 3, size, size), jnp.float32)
    label = f"equinox ResNet widths (32, 32, 64, 128) under vmap on 2x3x{size}x{size}"
  else:  # flax models
    if args.model == "convnext":
      import flax.linen as nn  # noqa: E402
      size = args.size or 1024
      model = _convnext(nn)
      x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
      label = (f"flax ConvNeXt-style stack (stem 4x4/4, 3 blocks: 7x7 depthwise, LayerNorm, "
               f"Dense 32 -> 128 -> 32) on 1x{size}x{size}x3")
    elif args.model == "unet":
      import flax_unet  # noqa: E402
      if args.remat:  # UNet.__call__ reads the module's ConvBlock when it runs
        import flax.linen as nn  # noqa: E402
        flax_unet.ConvBlock = nn.remat(flax_unet.ConvBlock)
      size = args.size or 2048
      model = flax_unet.UNet(widths=(32, 64, 128), out_channels=2)
      x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
      label = f"flax UNet widths (32, 64, 128) on 1x{size}x{size}x3"
    else:
      import flax_vae_decoder  # noqa: E402
      if args.remat:
        import flax.linen as nn  # noqa: E402
        flax_vae_decoder.ResBlock = nn.remat(flax_vae_decoder.ResBlock)
      size = args.size or 256
      model = flax_vae_decoder.Decoder(widths=(128, 64, 32), groups=32)
      x = jax.ShapeDtypeStruct((1, size, size, 4), jnp.float32)
      label = (f"flax VAE decoder widths (128, 64, 32), GroupNorm(32), on a 1x{size}x{size}x4 "
               f"latent (image {4 * size}x{4 * size})")
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    apply = model.apply
    init = lambda x: model.init(jax.random.key(0), x)
  grad = lambda f: jax.grad(lambda p, x: f(p, x).sum(), allow_int=True)  # haiku: int state
  tiled = jaxtile.tile_convs(apply, max_bytes=args.max_bytes)
  per_conv = jaxtile.tile_convs(apply, max_bytes=args.max_bytes, fuse=False)
  if args.remat:
    label += ", each block in nn.remat"
  print(f"jax {jax.__version__}; {label}, max_bytes {args.max_bytes / 2**20:g} MiB\n")
  print("| program | temporaries MiB | / untiled | trace + lower s | XLA compile s | total s |")
  print("|---|--:|--:|--:|--:|--:|")
  rows = [("forward, untiled", apply), ("forward, tiled (regions)", tiled),
          ("forward, tiled per conv (fuse=False)", per_conv),
          ("gradient, untiled", grad(apply)), ("gradient, tiled", grad(tiled)),
          ("gradient, tile_convs(jax.grad(f))",
           jaxtile.tile_convs(grad(apply), max_bytes=args.max_bytes))]
  base, best = {}, {}
  for round in range(args.compile_rounds):
    for name, fn in rows:
      jax.clear_caches()  # every round traces, rewrites, lowers and compiles afresh
      start = time.perf_counter()
      lowered = jax.jit(fn).lower(params, x)  # tracing, jaxtile's rewrite, lowering to HLO
      middle = time.perf_counter()
      compiled = lowered.compile()
      end = time.perf_counter()
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
      lower_s, compile_s = middle - start, end - middle
      if round:
        lower_s, compile_s = min(lower_s, best[name][0]), min(compile_s, best[name][1])
      best[name] = lower_s, compile_s
      if round + 1 == args.compile_rounds:
        kind = name.split(",")[0]
        base.setdefault(kind, temp)
        print(f"| {name} | {temp:.0f} | {temp / base[kind]:.2f} | {lower_s:.1f} | "
              f"{compile_s:.1f} | {lower_s + compile_s:.1f} |", flush=True)
  if args.time:
    import statistics
    real_x = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
    real_params = init(real_x)
    print()
    for kind, pair in (("forward", (apply, tiled)), ("gradient", (grad(apply), grad(tiled)))):
      fns = [jax.jit(f) for f in pair]
      outs = [jax.block_until_ready(f(real_params, real_x)) for f in fns]  # compile, warm up
      times = [[], []]
      for _ in range(args.time):
        for f, t in zip(fns, times):
          start = time.perf_counter()
          jax.block_until_ready(f(real_params, real_x))
          t.append(time.perf_counter() - start)
      untiled_s, tiled_s = (statistics.median(t) for t in times)
      diff = max((float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, outs))
                  if jnp.issubdtype(a.dtype, jnp.inexact)), default=0.0)
      print(f"{kind}, median of {args.time} alternating rounds: untiled {untiled_s:.2f} s, "
            f"tiled {tiled_s:.2f} s, tiled / untiled {tiled_s / untiled_s:.2f}; "
            f"max abs diff {diff:.1e}", flush=True)

if __name__ == "__main__":
  main()
