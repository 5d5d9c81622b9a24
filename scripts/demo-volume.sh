#!/usr/bin/env bash
# The main job, shown: volume "demo" exported over NBD by `lamina nbd`, 64 MiB of random
# data written into it with qemu-img, read back and compared.  Needs a running cluster
# (`lamina up`) with a volume "demo"; `make up` does all of it.
set -euo pipefail

BIN=${BIN:-.venv/bin}
CLUSTER=${CLUSTER:-./lamina-data/cluster.toml}
VOLUME=${VOLUME:-demo}
work=$(mktemp -d)
exporter=""
cleanup() {
    if [[ -n $exporter ]] && kill -0 "$exporter" 2>/dev/null; then
        kill -TERM "$exporter"
        wait "$exporter" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$BIN/lamina" nbd "$VOLUME" --listen 127.0.0.1:0 --port-file "$work/port" \
    --cluster "$CLUSTER" >"$work/nbd.log" 2>&1 &
exporter=$!
for _ in $(seq 600); do
    [[ -s $work/port ]] && break
    if ! kill -0 "$exporter" 2>/dev/null; then
        cat "$work/nbd.log" >&2
        exit 1
    fi
    sleep 0.1
done
[[ -s $work/port ]] || { echo "lamina nbd did not start" >&2; cat "$work/nbd.log" >&2; exit 1; }
port=$(cat "$work/port")
uri="nbd://127.0.0.1:$port"
echo "volume $VOLUME exported at $uri"
nbdinfo "$uri" | grep -E 'export-size|is_read_only' || true

head -c 64M /dev/urandom >"$work/in.img"
start=$(date +%s.%N)
qemu-img convert -n -f raw -O raw "$work/in.img" "$uri"
mid=$(date +%s.%N)
qemu-img convert -O raw --image-opts \
    "driver=raw,size=$((64 << 20)),file.driver=nbd,file.host=127.0.0.1,file.port=$port" \
    "$work/out.img"
end=$(date +%s.%N)
cmp "$work/in.img" "$work/out.img"
awk -v a="$start" -v b="$mid" -v c="$end" 'BEGIN {
    printf "64 MiB written through lamina nbd in %.2f s; read back in %.2f s: bit-exact\n", b - a, c - b }'
