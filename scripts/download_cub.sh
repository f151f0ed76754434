#!/usr/bin/env bash
# Download CUB-200-2011 and lay it out as t2v_lightning's "cub" / "cub_inat2018" readers expect:
#
#   ROOT/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}
#
# Usage: scripts/download_cub.sh [--delete-archive] ROOT
#
# The download resumes where an interrupted one stopped (curl -C - / wget -c), the archive is
# checked against the MD5 published with the dataset before it is extracted, and a finished
# extraction is remembered, so running the script again is cheap. About 1.2 GB to download,
# 1.2 GB more once extracted (--delete-archive removes the archive afterwards).
#
# Environment (for mirrors): T2V_CUB_URL, T2V_CUB_MD5.
set -euo pipefail

URL="${T2V_CUB_URL:-https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1}"
MD5="${T2V_CUB_MD5:-97eceeb196236b17998738112f37df78}"
ARCHIVE="CUB_200_2011.tgz"
MARKER="CUB_200_2011/.t2v_extracted"
REQUIRED="images.txt image_class_labels.txt train_test_split.txt classes.txt images"

usage() {
  echo "usage: $0 [--delete-archive] ROOT" >&2
  echo "  downloads CUB-200-2011 into ROOT/CUB_200_2011 (about 1.2 GB)" >&2
}

delete_archive=0
root=""
for arg in "$@"; do
  case "$arg" in
    --delete-archive) delete_archive=1 ;;
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

mkdir -p "$root"
cd "$root"

if [ -f "$MARKER" ]; then
  echo "CUB-200-2011 is already in $(pwd)/CUB_200_2011"
  exit 0
fi

if [ ! -f "$ARCHIVE.verified" ]; then
  echo "Downloading CUB-200-2011 (about 1.2 GB) into $(pwd)"
  # A failed or refused resume (e.g. of an already complete file) is judged by the checksum.
  fetch "$URL" "$ARCHIVE" || echo "the download stopped with an error; checking what is on disk"
  echo "Verifying $ARCHIVE"
  actual="$(md5_of "$ARCHIVE" 2>/dev/null || echo missing)"
  if [ "$actual" != "$MD5" ]; then
    echo "error: MD5 of $(pwd)/$ARCHIVE is $actual, expected $MD5." >&2
    echo "The download is incomplete or corrupt: run this script again to resume it, or" >&2
    echo "delete the file if it keeps failing." >&2
    exit 1
  fi
  touch "$ARCHIVE.verified"
fi

echo "Extracting $ARCHIVE"
tar -xzf "$ARCHIVE"
for f in $REQUIRED; do
  if [ ! -e "CUB_200_2011/$f" ]; then
    echo "error: $(pwd)/CUB_200_2011/$f is missing after extraction" >&2
    exit 1
  fi
done
touch "$MARKER"
if [ "$delete_archive" = 1 ]; then rm -f "$ARCHIVE" "$ARCHIVE.verified"; fi
echo "CUB-200-2011 is ready in $(pwd)/CUB_200_2011 (use root=$(pwd))"
