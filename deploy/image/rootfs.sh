#!/bin/sh
# The image's runtime filesystem: the Python interpreter and standard library, the probe's
# virtual environment, the shared libraries they load (found with ldd), the CA bundle, and
# a passwd/group naming the probe's user. No shell, no package manager, no pip.
#
#   rootfs.sh TARGET PYTHON VENV
#
# TARGET  directory to fill (the Dockerfile copies it into a `FROM scratch` stage)
# PYTHON  the interpreter's install prefix (/usr/local in the python:*-slim images)
# VENV    the virtual environment the probe is installed in (/opt/kubenurse)
#
# Every path keeps its absolute name, so the links a venv holds (bin/python -> PYTHON/bin/...)
# and the console script's #! line stay valid. tests/test_image.py runs this script on the
# test machine and starts the probe in the result with chroot.
set -eu

target=$1
python=$2
venv=$3
version=$("$python/bin/python3" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
stdlib="$python/lib/python$version"

mkdir -p "$target"
target=$(cd "$target" && pwd)
# From /: GNU cp --parents --preserve resolves the parent directories against the current one.
cd /
copy() {  # copy paths as they are (links stay links), under their absolute names
    for path in "$@"; do
        [ -e "$path" ] || [ -L "$path" ] || continue
        cp -dR --preserve=mode,timestamps --parents "$path" "$target"
    done
}

# The interpreter: its links (python -> python3 -> python3.11), the binary, libpython.
copy "$python/bin/python" "$python/bin/python3" "$python/bin/python$version"
for lib in "$python"/lib/libpython"$version"*.so*; do copy "$lib"; done
# The standard library, minus what installs packages (ensurepip, venv, site-packages with
# pip), needs a display (tkinter, idlelib, turtledemo), builds extensions (config-*), or
# tests Python itself.
for entry in "$stdlib"/* "$stdlib"/.[!.]*; do
    case "${entry##*/}" in
        ensurepip | venv | site-packages | tkinter | idlelib | turtledemo | test | lib2to3 | config-* | pydoc_data) ;;
        *) copy "$entry" ;;
    esac
done
mkdir -p "$target$stdlib/site-packages"

# The probe's environment, minus pip (installing anything is the build's business).
copy "$venv"
rm -rf "$target$venv"/bin/pip* "$target$venv"/bin/activate* "$target$venv"/bin/Activate.ps1
for dist in pip setuptools wheel _distutils_hack distutils-precedence.pth; do
    rm -rf "$target$venv"/lib/python"$version"/site-packages/"$dist" \
        "$target$venv"/lib/python"$version"/site-packages/"$dist"-*.dist-info
done

# Shared libraries: those of the interpreter and of every extension module, and the
# dynamic loader; each copied as a file under the name ldd reports (links followed).
find "$target" -type f \( -name '*.so' -o -name '*.so.*' -o -path "*/bin/python$version" \) \
    -exec ldd {} + 2>/dev/null \
    | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }' \
    | sort -u \
    | while read -r lib; do
        mkdir -p "$target$(dirname "$lib")"
        cp -L "$lib" "$target$lib"
    done

# CA certificates, where OpenSSL looks (/usr/lib/ssl/cert.pem and certs/ link to them).
copy /etc/ssl/certs/ca-certificates.crt /usr/lib/ssl/cert.pem /usr/lib/ssl/certs
# Who the numeric user is, and how names are looked up (getaddrinfo reads these).
mkdir -p "$target/etc" "$target/tmp"
chmod 1777 "$target/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' \
    >"$target/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$target/etc/group"
copy /etc/nsswitch.conf
