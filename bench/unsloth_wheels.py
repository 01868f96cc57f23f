"""Build .whl-unsloth/: the wheels configuration (c) (Unsloth) needs on the H200 machine, trimmed to travel.

python bench/unsloth_wheels.py [--out .whl-unsloth] [--download-dir /tmp/unsloth-dl]

Run where pip reaches PyPI. The device image (torch 2.11.0+cu130, Python 3.12, transformers 5.17.0, accelerate 1.15.0,
huggingface_hub 1.33.0, numpy, pandas, pyarrow, ...) lacks these; they install with
`python3 -m pip install --no-index --no-deps --no-compile --target /tmp/site-unsloth .whl-unsloth/*.whl` into a folder
of their own, which Unsloth's process alone puts on its PYTHONPATH, beside the machine's own transformers 5.17 (Unsloth
2026.10.9 pins transformers <= 5.17.0 and TRL <= 1.15.0; our stack in /tmp/site has transformers 5.23 and TRL 1.16).
Two wheels are repacked smaller (RECORD rewritten without the dropped files):
  unsloth: without studio/ (its web UI, 82 MB unpacked, never imported by training) and unsloth_cli/ (the `unsloth`
    command; the console-script entry point goes too);
  bitsandbytes: only libbitsandbytes_cuda130.so (torch.version.cuda 13.0 on the device) and the 63 KB cpu library of its
    native libraries (bitsandbytes picks libbitsandbytes_cuda{torch.version.cuda} at import).
"""
import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

# name==version, why it travels (every one is missing on the device, or there at a version that does not fit)
WHEELS = {
    "unsloth==2026.10.9": "the tool under test (newest release; pins transformers<=5.17.0, trl<=1.15.0, torch<2.15)",
    "unsloth_zoo==2026.10.9": "unsloth's kernels and patches (unsloth requires unsloth_zoo>=2026.10.9)",
    "bitsandbytes==0.50.2": "imported unconditionally by unsloth's GPU init and loader (trimmed: cuda130 + cpu libs)",
    "trl==1.15.0": "Unsloth's trainer is TRL's SFTTrainer, patched; unsloth requires trl<=1.15.0 (ours is 1.16)",
    "peft==0.21.2": "get_peft_model; the device's own peft version is not recorded, so the one ours uses travels",
    "datasets==4.8.5": "TRL and unsloth import it; unsloth requires datasets<5 (ours is 5.2.0), trl 1.15 >=4.7",
    "dill==0.4.1": "datasets (dill<0.4.2)",
    "multiprocess==0.70.19": "datasets (multiprocess<0.70.20)",
    "tyro==1.0.17": "unsloth and unsloth_zoo require it (TRL's script utilities)",
    "docstring_parser==0.18.0": "tyro",
    "typeguard==4.6.1": "tyro",
    "cut_cross_entropy==25.1.1": "unsloth_zoo's fused cross-entropy loss (required on Linux)",
    "torchao==0.18.0": "unsloth_zoo requires it (torchao>=0.13); unsloth imports parts of it at start",
    "msgspec==0.23.0": "unsloth_zoo requires it (import-time in its compiler cache)",
}
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(src, dst, drop):
    """Copy wheel src to dst without the members for which drop(name) is true; RECORD lists what is left."""
    with zipfile.ZipFile(src) as zin:
        names = [n for n in zin.namelist() if not drop(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            for n in names:
                if n == record:
                    continue
                data = zin.read(n)
                if n.endswith(".dist-info/entry_points.txt"):  # the dropped CLI's console script
                    data = b""
                zout.writestr(zin.getinfo(n), data)
                lines.append(record_line(n, data))
            lines.append(f"{record},,")
            zout.writestr(record, "\n".join(lines) + "\n")
    return len(zin.namelist()) - len(names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / ".whl-unsloth"))
    ap.add_argument("--download-dir", default="/tmp/unsloth-dl")
    a = ap.parse_args()
    dl, out = Path(a.download_dir), Path(a.out)
    dl.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(dl),
                    *WHEELS], check=True)
    for old in out.glob("*.whl"):
        old.unlink()
    total = 0
    for spec, why in WHEELS.items():
        name, version = spec.split("==")
        norm = name.replace("-", "_").lower()
        [src] = [p for p in dl.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
        dst = out / src.name
        if norm == "unsloth":
            n = repack(src, dst, lambda m: m.startswith(("studio/", "unsloth_cli/")))
        elif norm == "bitsandbytes":
            keep = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
            n = repack(src, dst, lambda m: m.endswith((".so", ".dll", ".dylib")) and not m.endswith(keep))
        else:
            n = 0
            dst.write_bytes(src.read_bytes())
        size = dst.stat().st_size
        total += size
        print(f"{dst.name:90s} {size / 1e6:7.2f} MB  {'(%d files dropped) ' % n if n else ''}{why}")
    print(f"total {total / 1e6:.2f} MB ({total / 2**20:.2f} MiB) in {out}")


if __name__ == "__main__":
    main()
