#!/usr/bin/env bash
# A released SQL script is never edited: users upgrade through exactly what
# was shipped. sql/released.sha256 pins every script of a released version.
set -euo pipefail
cd "$(dirname "$0")/../sql"
if ! sha256sum --quiet -c released.sha256; then
    echo "a released script in sql/ changed: add a new upgrade script instead" >&2
    exit 1
fi
for script in synapse--*.sql; do
    grep -q " $script\$" released.sha256 || {
        echo "sql/$script is not pinned in sql/released.sha256" >&2
        exit 1
    }
done
