"""Install a trained base as the embedded default, with its provenance.

``python -m condkit.embedded.install runs/base_vae runs/base_unet`` takes the VAE
stage's folder (``runs/base_vae/base``: trained VAE + the other components) and the
U-Net run (``runs/base_unet/unet``, written by the ``full_unet`` adapter), and writes
them as ``condkit/embedded/base/`` (replaced atomically), plus ``provenance.json``
recording both recipes, seeds, the git commit and the stage timings.

``python -m condkit.embedded.install --image-encoder runs/base_image_encoder`` puts the
image-encoder stage's trained ``image_encoder/`` into the installed base and adds that
stage to ``provenance.json`` (the other components and records stay as they are);
``--vae runs/base_vae_colours`` does the same for the VAE colour stage, and
``--unet runs/base_unet_colours`` for a U-Net continued on that VAE's latents (both flags
together install the VAE first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from condkit.embedded import EMBEDDED_BASE_DIR
from condkit.errors import UserError, report_user_errors
from condkit.io import atomic_folder

PROVENANCE_FILE = "provenance.json"
KEPT_FILES = ("TRAINING.md",)  # hand-written notes beside the weights survive a reinstall


def _git_commit(repo: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def install(vae_run: str | Path, unet_run: str | Path, dest: str | Path = EMBEDDED_BASE_DIR) -> Path:
    """Assemble the trained base into ``dest``.

    Args:
        vae_run: output folder of ``python -m condkit.train.vae`` (holds ``base/``, ``vae_summary.json``).
        unet_run: output folder of ``condkit train recipes/base/unet.yaml`` (holds ``unet/``, ``run.json``).
        dest: the folder to (re)place; default the package's embedded base.

    Returns:
        ``dest``.
    """
    vae_run, unet_run, dest = Path(vae_run), Path(unet_run), Path(dest)
    for required in (vae_run / "base" / "model_index.json", unet_run / "unet" / "config.json"):
        if not required.is_file():
            raise UserError(f"{required}: missing (run the base recipes first; see recipes/base/)")
    vae_summary = json.loads((vae_run / "vae_summary.json").read_text())
    unet_summary = json.loads((unet_run / "run.json").read_text()) if (unet_run / "run.json").is_file() else {}
    provenance = {
        "commit": _git_commit(Path(__file__).resolve().parents[2]),
        "vae_stage": {"recipe": "recipes/base/vae.yaml", **vae_summary},
        "unet_stage": {"recipe": "recipes/base/unet.yaml", **unet_summary},
    }
    with atomic_folder(dest) as tmp:
        shutil.copytree(vae_run / "base", tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", "__pycache__"))
        shutil.copytree(unet_run / "unet", tmp / "unet")
        for name in KEPT_FILES:
            if (dest / name).is_file():
                shutil.copy2(dest / name, tmp / name)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


def install_component(run: str | Path, component: str, stage: str, recipe: str, dest: str | Path = EMBEDDED_BASE_DIR) -> Path:
    """Put one stage's trained component (``vae`` or ``image_encoder``) into an installed base.

    Args:
        run: the stage's output folder (holds ``base/<component>/`` and ``<component>_summary.json``).
        component: the diffusers component folder to replace.
        stage: the ``provenance.json`` entry the stage's summary is recorded as.
        recipe: the recipe path recorded with it.
        dest: the installed base; everything but ``component`` is kept.

    Returns:
        ``dest``.
    """
    run, dest = Path(run), Path(dest)
    summary_file = run / f"{component}_summary.json"
    for required in (run / "base" / component / "config.json", summary_file, dest / "model_index.json"):
        if not required.is_file():
            raise UserError(f"{required}: missing (run {recipe} on an installed base first)")
    provenance = json.loads((dest / PROVENANCE_FILE).read_text()) if (dest / PROVENANCE_FILE).is_file() else {}
    provenance[stage] = {"recipe": recipe, "commit": _git_commit(Path(__file__).resolve().parents[2]), **json.loads(summary_file.read_text())}
    with atomic_folder(dest) as tmp:
        shutil.copytree(dest, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(component, "__pycache__"))
        shutil.copytree(run / "base" / component, tmp / component)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


def install_image_encoder(run: str | Path, dest: str | Path = EMBEDDED_BASE_DIR) -> Path:
    """Put the image-encoder stage's trained encoder into an installed base (``image_encoder_stage``).

    Args:
        run: output folder of ``python -m condkit.train.image_encoder``.
        dest: the installed base.
    """
    return install_component(run, "image_encoder", "image_encoder_stage", "recipes/base/image_encoder.yaml", dest)


def install_colour_vae(run: str | Path, dest: str | Path = EMBEDDED_BASE_DIR) -> Path:
    """Put the VAE colour stage's VAE into an installed base (``vae_colour_stage``).

    Args:
        run: output folder of ``python -m condkit.train.vae recipes/base/vae-colours.yaml``.
        dest: the installed base.
    """
    return install_component(run, "vae", "vae_colour_stage", "recipes/base/vae-colours.yaml", dest)


def install_unet_continuation(run: str | Path, dest: str | Path = EMBEDDED_BASE_DIR) -> Path:
    """Put a U-Net continued on a new VAE's latents into an installed base (``unet_colour_stage``).

    Args:
        run: output folder of ``condkit train recipes/base/unet.yaml --set base=<base with the new VAE>``
            (holds ``unet/`` and ``run.json``).
        dest: the installed base; everything but ``unet`` is kept.
    """
    run, dest = Path(run), Path(dest)
    for required in (run / "unet" / "config.json", run / "run.json", dest / "model_index.json"):
        if not required.is_file():
            raise UserError(f"{required}: missing (continue the U-Net with recipes/base/unet.yaml first; see TRAINING.md)")
    provenance = json.loads((dest / PROVENANCE_FILE).read_text()) if (dest / PROVENANCE_FILE).is_file() else {}
    provenance["unet_colour_stage"] = {"recipe": "recipes/base/unet.yaml", "commit": _git_commit(Path(__file__).resolve().parents[2]),
                                       **json.loads((run / "run.json").read_text())}
    with atomic_folder(dest) as tmp:
        shutil.copytree(dest, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", "__pycache__"))
        shutil.copytree(run / "unet", tmp / "unet")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


def main() -> int:
    """``python -m condkit.embedded.install VAE_RUN UNET_RUN [--dest DIR]`` or ``--image-encoder RUN``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae_run", nargs="?")
    parser.add_argument("unet_run", nargs="?")
    parser.add_argument("--image-encoder", metavar="RUN", help="install only the image-encoder stage's encoder")
    parser.add_argument("--vae", metavar="RUN", help="install only the VAE colour stage's VAE")
    parser.add_argument("--unet", metavar="RUN", help="install only a U-Net continued on the installed VAE's latents")
    parser.add_argument("--dest", type=Path, default=EMBEDDED_BASE_DIR)
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = parser.parse_args()
    if not (args.image_encoder or args.vae or args.unet) and not (args.vae_run and args.unet_run):
        parser.error("give VAE_RUN and UNET_RUN, --image-encoder RUN, --vae RUN or --unet RUN")

    def run() -> int:
        if args.image_encoder:
            print(install_image_encoder(args.image_encoder, args.dest))
        elif args.vae or args.unet:  # the VAE first: the U-Net continuation belongs to its latents
            if args.vae:
                print(install_colour_vae(args.vae, args.dest))
            if args.unet:
                print(install_unet_continuation(args.unet, args.dest))
        else:
            print(install(args.vae_run, args.unet_run, args.dest))
        return 0

    return report_user_errors(run, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
