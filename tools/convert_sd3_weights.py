"""Converts a diffusers SD3 / D-DiT folder into a dual_diffusion checkpoint, or exports one back.

    python tools/convert_sd3_weights.py --src SRC --dst DST [--dtype float32|bfloat16] [--mask-embedding FILE]
    python tools/convert_sd3_weights.py --to-diffusers --src DST --dst OUT [--dtype ...]

SRC: a diffusers folder in the SD3 layout (transformer/, vae/, text_encoder_3/, tokenizer_3/; CLIP folders
are not used) or the D-DiT release's (T5 in text_encoder/, its tokenizer in tokenizer/): each component
is found by its class in model_index.json, or, without one, in each subfolder's config.json; the
folders used are printed. DST must be absent or an empty folder.
A D-DiT release converts exactly; a plain SD3/SD3.5 transformer becomes a D-DiT
initialisation whose new parameters are printed and recorded in DST/dual_diffusion.json
(without --mask-embedding, T5's mask-token row stays unaligned: a warning, and a record in the JSON).
Without --dtype every tensor keeps its source dtype, and --to-diffusers reproduces
the source tensors bit for bit. No PyTorch needed (except for a .pth mask embedding).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; keep accelerators free


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error of this tool (argparse adds the usage)
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="diffusers folder (or, with --to-diffusers, a converted checkpoint)")
    p.add_argument("--dst", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="store tensors in this dtype (default: keep each tensor's source dtype)")
    p.add_argument("--mask-embedding", default=None,
                   help="(d_model,) or (1, d_model) tensor (.safetensors, .npy, or weights-only .pth) that "
                        "replaces T5's embedding row of the mask token <extra_id_0>")
    p.add_argument("--to-diffusers", action="store_true", help="export a converted checkpoint to diffusers")
    p.add_argument("--max-shard-gb", type=float, default=10.0, help="export: max size of one safetensors file")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import dual_diffusion  # noqa: F401  (flax config before any module is built)
    from dual_diffusion.convert.layout import check_destination
    from dual_diffusion.convert.safetensors_io import SafetensorsError

    try:
        check_destination(args.dst, "--dst")  # before any work: nothing is read or written on a bad --dst
        if args.to_diffusers:
            from dual_diffusion.convert.export import export_to_diffusers

            if args.mask_embedding:
                raise ValueError("--mask-embedding applies to conversion, not to --to-diffusers")
            export_to_diffusers(args.src, args.dst, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.no_progress)
            print(f"exported {args.src} -> {args.dst} (diffusers layout)")
            return 0
        from dual_diffusion.convert.convert_to_jax import convert

        info = convert(args.src, args.dst, dtype=args.dtype, mask_embedding=args.mask_embedding,
                       progress=not args.no_progress)
    except (SafetensorsError, ValueError, KeyError, OSError) as e:  # OSError: unreadable / missing files
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, record in info["components"].items():
        new, dropped = record["new_params"], record["dropped_sources"]
        if new or dropped:
            print(f"{name}: {len(new)} new parameters (random init, seed {info['init_seed']}):")
            for key in new:
                print(f"  new      {key}")
            for key in dropped:
                print(f"  dropped  {key}")
    mask = info["mask_embedding"]
    print(f"mask token row {mask['id']} ({mask['token']}): {mask['row']}, from {mask['source']}"
          + (" (see the warning above)" if mask["row"] == "unaligned" else ""))
    print(f"converted {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
