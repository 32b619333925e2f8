# shellcheck shell=bash
# Helpers sourced by the launch scripts (not run directly).

die() {
  echo "error: $*" >&2
  exit 2
}

# Quote one word for a POSIX shell, leaving plain words (flags, paths, gs:// URLs) as they are;
# `--flag=value` keeps the flag outside the quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line as a shell would need it typed.
join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s\n' "$out"
}

# Print the command; run it unless DRY_RUN=1 (then printing is all it does).
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    join_quoted "$@"
  else
    echo "+ $(join_quoted "$@")" >&2
    "$@"
  fi
}
