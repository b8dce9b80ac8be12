#!/usr/bin/env bash
# Sluice as an OCI image that Istio's and Envoy Gateway's Wasm fetchers load:
# the "compat" Wasm image variant (solo-io wasm-image-spec, spec-compat.md),
#
#   manifest   application/vnd.oci.image.manifest.v1+json,
#              annotation module.wasm.image/variant=compat
#   config     application/vnd.oci.image.config.v1+json (os wasip1, architecture wasm)
#   one layer  application/vnd.oci.image.layer.v1.tar+gzip: a tar holding plugin.wasm
#
# written as an OCI image layout without Docker, buildah or a daemon: tar,
# gzip and sha256sum, with every byte fixed (tar mtime 0, owner 0, gzip -n),
# so the same sluice.wasm always gives the same manifest digest.
#
#   scripts/oci-image.sh build [--wasm FILE] [--out DIR] [--tag TAG]
#       Writes the layout DIR (default target/oci/sluice) tagged TAG (default:
#       the filter's version in filter/Cargo.toml) from FILE (default
#       target/wasm32-wasip1/release/sluice.wasm), then checks it with
#       `skopeo inspect` and `umoci` (ls, stat, and raw unpack: the unpacked
#       plugin.wasm must be FILE byte for byte). Prints
#         oci-image: built oci:DIR:TAG
#         oci-image: manifest sha256:<hex>     <- the digest a WasmPlugin's `sha256`
#                                                 and Envoy Gateway's `image.sha256` want
#         oci-image: plugin.wasm sha256:<hex>
#
#   scripts/oci-image.sh roundtrip --registry 127.0.0.1:PORT [--out DIR] [--tag TAG]
#                                  [--wasm FILE] [--pulled DIR]
#       Pushes oci:DIR:TAG with skopeo to a plain-HTTP registry on LOOPBACK
#       (envoy/tests/oci_image.rs starts Debian's docker-registry for it) as
#       sluice:TAG, inspects it there, pulls it back into the layout --pulled
#       (default DIR-pulled), unpacks that with umoci and compares its
#       plugin.wasm with FILE. Prints
#         oci-image: pushed docker://HOST:PORT/sluice:TAG manifest sha256:<hex>
#         oci-image: pulled plugin.wasm sha256:<hex>
#         oci-image: roundtrip ok
#       It refuses any other registry: for a real one, use skopeo directly
#       (README, "Deploying"):
#         skopeo copy oci:target/oci/sluice:0.1.0 docker://registry.example/sluice/sluice:0.1.0
#
# Needs skopeo and umoci (scripts/setup.sh installs them, and docker-registry).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { echo "oci-image: $*"; }
die() {
    echo "oci-image: error: $*" >&2
    exit 1
}
usage() {
    sed -n '2,39p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/setup.sh (Debian package '$tool')"
    done
}

default_tag() {
    sed -n 's/^version = "\([^"]*\)"$/\1/p' "$ROOT/filter/Cargo.toml" | head -n1
}

# A policy for skopeo's signature checks that accepts any image: the system's
# /etc/containers/policy.json may be missing, and this script only moves an
# image it built itself (or pulls back the one it pushed, then checks it).
skopeo_() {
    skopeo --policy "$WORK/policy.json" "$@"
}

WORK=""
cleanup() { if [ -n "$WORK" ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT
new_work() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-oci.XXXXXX")"
    printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$WORK/policy.json"
}

# Puts a blob under DIR/blobs/sha256/ and sets BLOB_DIGEST and BLOB_SIZE.
add_blob() {
    local dir="$1" file="$2"
    BLOB_DIGEST="$(sha256_of "$file")"
    BLOB_SIZE="$(size_of "$file")"
    cp "$file" "$dir/blobs/sha256/$BLOB_DIGEST"
}

# The manifest digest of TAG in the OCI layout DIR, as skopeo reads it.
layout_digest() {
    skopeo_ inspect --format '{{.Digest}}' "oci:$1:$2"
}

# umoci's checks of the layout DIR:TAG: it lists the tag, reads the manifest,
# config and history (stat), and unpacks the layer, verifying every blob's
# digest (and the layer's diff_id) as it reads it. Prints the sha256 of the unpacked plugin.wasm, and
# fails unless plugin.wasm is the layer's one file.
umoci_check() {
    local dir="$1" tag="$2" bundle
    umoci ls --layout "$dir" | grep -qx "$tag" || die "umoci ls: tag $tag not in $dir"
    umoci stat --image "$dir:$tag" >"$WORK/umoci-stat.txt" || die "umoci stat failed on $dir:$tag"
    # `raw unpack`: the rootfs alone. `umoci unpack` would also generate a
    # runtime bundle's config.json, which it refuses for an OS other than
    # Linux, and this image's is wasip1.
    bundle="$WORK/rootfs-$RANDOM"
    umoci raw unpack --rootless --image "$dir:$tag" "$bundle" >"$WORK/umoci-unpack.txt" 2>&1 ||
        die "umoci raw unpack failed on $dir:$tag: $(cat "$WORK/umoci-unpack.txt")"
    local files
    files="$(cd "$bundle" && find . -mindepth 1 | sort | tr '\n' ' ')"
    [ "$files" = "./plugin.wasm " ] || die "the layer must hold plugin.wasm alone, holds: $files"
    sha256_of "$bundle/plugin.wasm"
}

build() {
    local wasm="$ROOT/target/wasm32-wasip1/release/sluice.wasm" out="$ROOT/target/oci/sluice" tag=""
    while [ $# -gt 0 ]; do
        case "$1" in
        --wasm) wasm="${2:?}"; shift 2 ;;
        --out) out="${2:?}"; shift 2 ;;
        --tag) tag="${2:?}"; shift 2 ;;
        *) usage ;;
        esac
    done
    [ -n "$tag" ] || tag="$(default_tag)"
    [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "not a valid tag: '$tag'"
    [ -f "$wasm" ] || die "$wasm not found: cargo build --release --target wasm32-wasip1 -p sluice"
    [ "$(head -c 4 "$wasm" | od -An -tx1 | tr -d ' \n')" = "0061736d" ] || die "$wasm is not a Wasm module"
    need skopeo umoci tar gzip sha256sum
    new_work

    # The layout directory is replaced whole; never remove something else.
    if [ -e "$out" ]; then
        if [ -f "$out/oci-layout" ] || [ -z "$(ls -A "$out")" ]; then
            rm -rf "$out"
        else
            die "$out exists and is not an OCI layout; refusing to replace it"
        fi
    fi
    mkdir -p "$out/blobs/sha256"

    # The layer: plugin.wasm alone, with fixed metadata.
    mkdir "$WORK/layer"
    cp "$wasm" "$WORK/layer/plugin.wasm"
    local wasm_sha
    wasm_sha="$(sha256_of "$WORK/layer/plugin.wasm")"
    tar --create --format=ustar --no-recursion --owner=0 --group=0 --numeric-owner \
        --mode=0644 --mtime=@0 --file="$WORK/layer.tar" -C "$WORK/layer" plugin.wasm
    gzip -9 -n -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"
    local diff_id
    diff_id="$(sha256_of "$WORK/layer.tar")"
    add_blob "$out" "$WORK/layer.tar.gz"
    local layer_digest="$BLOB_DIGEST" layer_size="$BLOB_SIZE"

    # The image config. `created` is the epoch, as the tar's mtime (a real
    # time would change every digest; umoci stat wants one in the history),
    # and the history names what the layer holds.
    printf '{"created":"1970-01-01T00:00:00Z","architecture":"wasm","os":"wasip1","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"scripts/oci-image.sh: plugin.wasm sha256:%s"}]}' \
        "$diff_id" "$wasm_sha" >"$WORK/config.json"
    add_blob "$out" "$WORK/config.json"
    local config_digest="$BLOB_DIGEST" config_size="$BLOB_SIZE"

    # The manifest, with the compat variant's annotation.
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}],"annotations":{"module.wasm.image/variant":"compat","org.opencontainers.image.title":"sluice"}}' \
        "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$WORK/manifest.json"
    add_blob "$out" "$WORK/manifest.json"
    local manifest_digest="$BLOB_DIGEST" manifest_size="$BLOB_SIZE"

    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
        "$manifest_digest" "$manifest_size" "$tag" >"$out/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"

    # skopeo: reads the layout and reports the manifest we wrote, the variant
    # annotation and one layer.
    local seen
    seen="$(layout_digest "$out" "$tag")" || die "skopeo inspect failed on oci:$out:$tag"
    [ "$seen" = "sha256:$manifest_digest" ] || die "skopeo sees manifest $seen, wrote sha256:$manifest_digest"
    skopeo_ inspect --raw "oci:$out:$tag" >"$WORK/raw.json"
    cmp -s "$WORK/raw.json" "$WORK/manifest.json" || die "skopeo inspect --raw differs from the manifest written"
    skopeo_ inspect --config "oci:$out:$tag" >/dev/null || die "skopeo cannot read the image config"
    [ "$(skopeo_ inspect --format '{{len .Layers}}' "oci:$out:$tag")" = 1 ] || die "skopeo sees more than one layer"

    # umoci: an independent reader of the layout.
    local unpacked
    unpacked="$(umoci_check "$out" "$tag")"
    [ "$unpacked" = "$wasm_sha" ] || die "umoci unpacked plugin.wasm sha256:$unpacked, built from sha256:$wasm_sha"

    say "built oci:$out:$tag"
    say "manifest sha256:$manifest_digest"
    say "plugin.wasm sha256:$wasm_sha"
}

roundtrip() {
    local wasm="$ROOT/target/wasm32-wasip1/release/sluice.wasm" out="$ROOT/target/oci/sluice" tag="" registry="" pulled=""
    while [ $# -gt 0 ]; do
        case "$1" in
        --wasm) wasm="${2:?}"; shift 2 ;;
        --out) out="${2:?}"; shift 2 ;;
        --tag) tag="${2:?}"; shift 2 ;;
        --registry) registry="${2:?}"; shift 2 ;;
        --pulled) pulled="${2:?}"; shift 2 ;;
        *) usage ;;
        esac
    done
    [ -n "$tag" ] || tag="$(default_tag)"
    [ -n "$pulled" ] || pulled="$out-pulled"
    [[ "$registry" =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\]):[0-9]+$ ]] ||
        die "--registry must be a loopback HOST:PORT (plain HTTP, TLS checks off); got '$registry'"
    [ -f "$out/oci-layout" ] || die "no OCI layout at $out: run '$0 build' first"
    [ -f "$wasm" ] || die "$wasm not found"
    need skopeo umoci sha256sum
    new_work

    local built remote ref="docker://$registry/sluice:$tag"
    built="$(layout_digest "$out" "$tag")" || die "skopeo cannot read oci:$out:$tag"

    # Push. --preserve-digests: fail rather than let skopeo rewrite the
    # manifest (the digest a WasmPlugin pins must be the one built).
    skopeo_ copy --quiet --preserve-digests --dest-tls-verify=false "oci:$out:$tag" "$ref" ||
        die "skopeo copy to $ref failed"

    remote="$(skopeo_ inspect --tls-verify=false --format '{{.Digest}}' "$ref")" || die "skopeo inspect $ref failed"
    [ "$remote" = "$built" ] || die "the registry serves manifest $remote, built $built"
    skopeo_ inspect --tls-verify=false --raw "$ref" >"$WORK/remote.json"
    [ "sha256:$(sha256_of "$WORK/remote.json")" = "$built" ] || die "the registry's raw manifest does not hash to $built"
    grep -q '"module.wasm.image/variant":"compat"' "$WORK/remote.json" || die "the pushed manifest lost the compat annotation"
    say "pushed $ref manifest $remote"

    # Pull back into a fresh layout, and unpack it with umoci.
    if [ -e "$pulled" ]; then
        [ -f "$pulled/oci-layout" ] || die "$pulled exists and is not an OCI layout; refusing to replace it"
        rm -rf "$pulled"
    fi
    skopeo_ copy --quiet --preserve-digests --src-tls-verify=false "$ref" "oci:$pulled:$tag" ||
        die "skopeo copy from $ref failed"
    [ "$(layout_digest "$pulled" "$tag")" = "$built" ] || die "the pulled image's manifest is not $built"
    local got want
    got="$(umoci_check "$pulled" "$tag")"
    want="$(sha256_of "$wasm")"
    say "pulled plugin.wasm sha256:$got"
    [ "$got" = "$want" ] || die "pulled plugin.wasm sha256:$got, but $wasm is sha256:$want"
    say "roundtrip ok"
}

case "${1:-}" in
build) shift; build "$@" ;;
roundtrip) shift; roundtrip "$@" ;;
*) usage ;;
esac
