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

``python -m condkit.embedded.install --sdxl runs/base_sdxl_untrained runs/base_sdxl_unet``
installs the embedded SDXL base (``base: embedded-sdxl``): the folder
``python -m condkit.embedded.build_sdxl`` wrote, with the U-Net that
``recipes/base/unet-sdxl.yaml`` trained on it, as ``condkit/embedded/base_sdxl/``
(condkit/embedded/TRAINING-sdxl.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from condkit.embedded import EMBEDDED_BASE_DIR, EMBEDDED_SDXL_BASE_DIR, SDXL_TRAINING_DOC
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


def install_sdxl(built: str | Path, unet_run: str | Path, quality: str | Path | None = None, dest: str | Path = EMBEDDED_SDXL_BASE_DIR) -> Path:
    """Assemble the trained embedded SDXL base into ``dest`` (replaced atomically), with ``provenance.json``.

    Args:
        built: the folder ``python -m condkit.embedded.build_sdxl`` wrote (every component
            but the trained U-Net).
        unet_run: output folder of ``condkit train recipes/base/unet-sdxl.yaml`` on ``built``
            (holds ``unet/`` and ``run.json``).
        quality: optional ``--json`` output of ``benchmarks/embedded_base_quality.py`` on
            the trained folder, recorded in the provenance.
        dest: the folder to (re)place; default ``condkit/embedded/base_sdxl/``.

    Returns:
        ``dest``.

    Raises:
        UserError: a missing file, or a U-Net whose architecture is not the built folder's.
    """
    built, unet_run, dest = Path(built), Path(unet_run), Path(dest)
    required = [built / "model_index.json", built / "unet" / "config.json", unet_run / "unet" / "config.json", unet_run / "run.json"]
    for path in required + ([Path(quality)] if quality else []):
        if not path.is_file():
            raise UserError(f"{path}: missing (build, train and measure the SDXL base first; see {SDXL_TRAINING_DOC})")
    if _architecture(unet_run / "unet") != _architecture(built / "unet"):
        raise UserError(f"{unet_run / 'unet' / 'config.json'}: not the architecture of {built / 'unet'} (train recipes/base/unet-sdxl.yaml on that folder)")
    provenance = {
        "commit": _git_commit(Path(__file__).resolve().parents[2]),
        "build": {"command": "python -m condkit.embedded.build_sdxl", "sha256": _digests(built, exclude="unet")},
        "unet_stage": {"recipe": "recipes/base/unet-sdxl.yaml", **json.loads((unet_run / "run.json").read_text())},
    }
    if quality:
        provenance["quality"] = json.loads(Path(quality).read_text())
    with atomic_folder(dest) as tmp:
        shutil.copytree(built, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", "__pycache__", PROVENANCE_FILE))
        shutil.copytree(unet_run / "unet", tmp / "unet")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


def _architecture(unet_dir: Path) -> dict:
    """A U-Net's ``config.json`` without diffusers' bookkeeping keys (``_name_or_path``, version)."""
    return {k: v for k, v in json.loads((unet_dir / "config.json").read_text()).items() if not k.startswith("_")}


def _digests(folder: Path, exclude: str) -> dict[str, str]:
    """SHA-256 of every weight file under ``folder`` but ``exclude/``, by relative path."""
    files = sorted(p for p in folder.rglob("*.safetensors") if p.relative_to(folder).parts[0] != exclude)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def main() -> int:
    """``python -m condkit.embedded.install VAE_RUN UNET_RUN [--dest DIR]``, ``--image-encoder RUN``, ... or ``--sdxl BUILT UNET_RUN``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae_run", nargs="?")
    parser.add_argument("unet_run", nargs="?")
    parser.add_argument("--image-encoder", metavar="RUN", help="install only the image-encoder stage's encoder")
    parser.add_argument("--vae", metavar="RUN", help="install only the VAE colour stage's VAE")
    parser.add_argument("--unet", metavar="RUN", help="install only a U-Net continued on the installed VAE's latents")
    parser.add_argument("--sdxl", nargs=2, metavar=("BUILT", "UNET_RUN"), help="install the embedded SDXL base: build_sdxl's folder and the unet-sdxl run")
    parser.add_argument("--quality", metavar="JSON", help="with --sdxl: benchmarks/embedded_base_quality.py --json output, kept in the provenance")
    parser.add_argument("--dest", type=Path, help="the folder to write (default: the package's embedded base, base_sdxl/ with --sdxl)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = parser.parse_args()
    if not (args.image_encoder or args.vae or args.unet or args.sdxl) and not (args.vae_run and args.unet_run):
        parser.error("give VAE_RUN and UNET_RUN, --image-encoder RUN, --vae RUN, --unet RUN or --sdxl BUILT UNET_RUN")
    if args.quality and not args.sdxl:
        parser.error("--quality goes with --sdxl")
    dest = args.dest or (EMBEDDED_SDXL_BASE_DIR if args.sdxl else EMBEDDED_BASE_DIR)

    def run() -> int:
        if args.sdxl:
            print(install_sdxl(*args.sdxl, quality=args.quality, dest=dest))
        elif args.image_encoder:
            print(install_image_encoder(args.image_encoder, dest))
        elif args.vae or args.unet:  # the VAE first: the U-Net continuation belongs to its latents
            if args.vae:
                print(install_colour_vae(args.vae, dest))
            if args.unet:
                print(install_unet_continuation(args.unet, dest))
        else:
            print(install(args.vae_run, args.unet_run, dest))
        return 0

    return report_user_errors(run, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
