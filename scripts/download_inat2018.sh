#!/usr/bin/env bash
# Download iNaturalist 2018 (train/val images, their annotations and the un-obfuscated
# categories) and lay it out as t2v_lightning's "inat2018" / "cub_inat2018" readers expect:
#
#   ROOT/inat2018/{train2018.json,val2018.json,categories.json,train_val2018/}
#
# Usage: scripts/download_inat2018.sh [--yes] [--delete-archives] ROOT
#
# iNaturalist 2018 is large: plan for about 319 GB of free disk (the 120 GB train/val image
# archive plus its extracted images and the annotations). --delete-archives removes each archive
# once it is verified and extracted. The test images are not needed and not fetched.
#
# Every download resumes where an interrupted one stopped (curl -C - / wget -c); archives are
# checked against the MD5 sums published with the dataset (categories.json.tar.gz has none
# published) before extraction; finished steps are remembered, so running the script again
# continues where it stopped.
#
# Environment (for mirrors): T2V_INAT_BASE_URL (folder holding the archives).
set -euo pipefail

BASE_URL="${T2V_INAT_BASE_URL:-https://ml-inat-competition-datasets.s3.amazonaws.com/2018}"
# archive, published MD5 ("-" where none is published), what extracting it must create
FILES=(
  "train2018.json.tar.gz bfa29d89d629cbf04d826a720c0a68b0 train2018.json"
  "val2018.json.tar.gz f2ed8bfe3e9901cdefceb4e53cd3775d val2018.json"
  "categories.json.tar.gz - categories.json"
  "train_val2018.tar.gz b1c6952ce38f31868cc50ea72d066cc3 train_val2018"
)
NEEDED_GB=319

usage() {
  echo "usage: $0 [--yes] [--delete-archives] ROOT" >&2
  echo "  downloads iNaturalist 2018 train/val into ROOT/inat2018 (about ${NEEDED_GB} GB)" >&2
}

assume_yes=0
delete_archives=0
root=""
for arg in "$@"; do
  case "$arg" in
    -y|--yes) assume_yes=1 ;;
    --delete-archives) delete_archives=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; usage; exit 2 ;;
    *)
      if [ -n "$root" ]; then echo "only one ROOT may be given" >&2; usage; exit 2; fi
      root="$arg" ;;
  esac
done
if [ -z "$root" ]; then usage; exit 2; fi

# shellcheck source=scripts/download_common.sh
. "$(cd "$(dirname "$0")" && pwd)/download_common.sh"

mkdir -p "$root/inat2018"
cd "$root/inat2018"

all_done=1
for entry in "${FILES[@]}"; do
  read -r archive _ _ <<<"$entry"
  [ -f ".$archive.extracted" ] || all_done=0
done
if [ "$all_done" = 1 ]; then
  echo "iNaturalist 2018 is already in $(pwd)"
  exit 0
fi

cat <<EOF
iNaturalist 2018 needs about ${NEEDED_GB} GB of free disk in $(pwd):
the train/val image archive alone is 120 GB, and its extracted images take about as much again.
Use --delete-archives to remove each archive after it has been verified and extracted.
EOF
free_kb="$(df -Pk . | awk 'NR == 2 {print $4}')"
if [ -n "$free_kb" ]; then
  echo "Free space here: $((free_kb / 1024 / 1024)) GB."
fi
if [ "$assume_yes" != 1 ]; then
  if [ -t 0 ]; then
    read -r -p "Continue? [y/N] " answer
    case "$answer" in y|Y|yes|YES) ;; *) echo "Stopped."; exit 1 ;; esac
  else
    echo "error: not a terminal; pass --yes to start the download" >&2
    exit 1
  fi
fi

for entry in "${FILES[@]}"; do
  read -r archive md5 creates <<<"$entry"
  if [ -f ".$archive.extracted" ]; then
    echo "$archive: already extracted"
    continue
  fi
  if [ ! -f ".$archive.verified" ]; then
    echo "Downloading $archive"
    # A failed or refused resume (e.g. of a complete file) is judged by the checksum below.
    fetch "$BASE_URL/$archive" "$archive" || echo "the download stopped with an error"
    if [ ! -s "$archive" ]; then
      echo "error: $(pwd)/$archive was not downloaded; run this script again to retry" >&2
      exit 1
    fi
    if [ "$md5" != "-" ]; then
      echo "Verifying $archive (this takes a while for large files)"
      actual="$(md5_of "$archive")"
      if [ "$actual" != "$md5" ]; then
        echo "error: MD5 of $(pwd)/$archive is $actual, expected $md5." >&2
        echo "The download is incomplete or corrupt: run this script again to resume it, or" >&2
        echo "delete the file if it keeps failing." >&2
        exit 1
      fi
    elif ! gzip -t "$archive"; then
      echo "error: $(pwd)/$archive is not a complete gzip file (no MD5 is published for it);" >&2
      echo "run this script again to resume it, or delete the file if it keeps failing." >&2
      exit 1
    fi
    touch ".$archive.verified"
  fi
  echo "Extracting $archive"
  tar -xzf "$archive"
  if [ ! -e "$creates" ]; then
    echo "error: extracting $archive did not create $(pwd)/$creates" >&2
    exit 1
  fi
  touch ".$archive.extracted"
  if [ "$delete_archives" = 1 ]; then rm -f "$archive"; fi
done

echo "iNaturalist 2018 is ready in $(pwd) (use root=$(cd .. && pwd))"
