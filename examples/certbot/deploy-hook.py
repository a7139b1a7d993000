#!/usr/bin/env python3
"""certbot deploy hook: publish the renewed lineage to a fenced key store.

certbot runs this after each successful renewal with RENEWED_LINEAGE set to
the lineage's live directory. Run certbot under ``singlewriter exec``, which
exports the lease's fencing token as SINGLEWRITER_TOKEN. The key store
rejects the commit if a writer with a higher token has already published,
so a certbot that was paused past its lease cannot overwrite newer files.

Environment:
  RENEWED_LINEAGE       set by certbot: /etc/letsencrypt/live/NAME
  SINGLEWRITER_TOKEN    set by singlewriter exec
  CERTIFICATE_STORES    directory under which the store NAME is kept
                        (default /var/lib/singlewriter/stores)

Exit status: 0 committed, 1 any failure, 76 rejected as stale.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from singlewriter import SingleWriterError, StaleTokenError
from singlewriter.keystore import REQUIRED_NAMES, KeyStore

STALE = 76


def main() -> int:
    try:
        lineage = Path(os.environ["RENEWED_LINEAGE"])
        token = int(os.environ["SINGLEWRITER_TOKEN"])
    except (KeyError, ValueError) as exc:
        print(
            f"deploy-hook: {exc} is missing or invalid; run certbot under"
            " `singlewriter exec` and let certbot call this hook",
            file=sys.stderr,
        )
        return 1

    stores = Path(os.environ.get("CERTIFICATE_STORES", "/var/lib/singlewriter/stores"))
    files = {name: (lineage / name).read_bytes() for name in REQUIRED_NAMES}
    try:
        generation = KeyStore(stores / lineage.name).commit(token, files)
    except StaleTokenError as exc:
        print(f"deploy-hook: rejected as stale: {exc}", file=sys.stderr)
        return STALE
    except SingleWriterError as exc:
        print(f"deploy-hook: commit failed: {exc}", file=sys.stderr)
        return 1

    print(f"deploy-hook: published {lineage.name} as generation {generation.sequence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
