# Helpers shared by the dataset download scripts (sourced, not run).

fetch() {  # fetch URL FILE: resumable download
  if command -v curl >/dev/null 2>&1; then
    curl --fail --location --retry 5 --continue-at - --output "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget --continue --tries=5 --output-document="$2" "$1"
  else
    echo "error: neither curl nor wget is installed" >&2
    exit 1
  fi
}

md5_of() {  # md5_of FILE: the file's MD5 hex digest
  if command -v md5sum >/dev/null 2>&1; then md5sum "$1" | cut -d' ' -f1; else md5 -q "$1"; fi
}
