# shellcheck shell=bash
# A real S3-compatible server for tests and benches: s3s-fs (Apache-2.0) from
# crates.io, built once into a cache (about 2.5 min on 2 cores) that later runs
# reuse. 0.14.1 is the newest that builds with this toolchain (0.17 needs
# rustc 1.96).

# s3s_fs_install: sets s3s_fs_bin, building it into the cache if missing.
s3s_fs_install() {
  local root=${SWITCHBOARD_S3S_FS_CACHE:-$HOME/.cache/switchboard/s3s-fs-0.14.1}
  if [[ ! -x "$root/bin/s3s-fs" ]]; then
    cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet --root "$root" >&2 || return
  fi
  s3s_fs_bin="$root/bin/s3s-fs"
}

# s3s_fs_start DIR PORT ACCESS SECRET: serves DIR on 127.0.0.1:PORT with the
# bucket `switchboard`; sets s3s_fs_pid once it listens.
s3s_fs_start() {
  local dir=$1 port=$2
  mkdir -p "$dir/switchboard"
  "$s3s_fs_bin" --host 127.0.0.1 --port "$port" --access-key "$3" --secret-key "$4" "$dir" \
    > "$dir.log" 2>&1 &
  s3s_fs_pid=$!
  for _ in $(seq 200); do
    (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$s3s_fs_pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "s3s-fs did not start on port $port:" >&2
  cat "$dir.log" >&2
  return 1
}
