#!/bin/sh
# Run `certbot renew` with one writer at a time, across every host that
# shares the lock. The fencing token reaches certbot's deploy hook as
# SINGLEWRITER_TOKEN, and deploy-hook.py commits with it.
#
# Exit status: certbot's own, 75 when another host holds the lock (the
# systemd unit treats that as success), 76 when the lease was lost while
# certbot ran (certbot and its children were stopped).
set -eu

: "${SINGLEWRITER_LOCK:?set SINGLEWRITER_LOCK, for example redis://lock.internal:6379/0}"

exec singlewriter exec \
    --name certbot-renew \
    --ttl 60 \
    --grace 20 \
    --timeout 0 \
    -- certbot renew --non-interactive \
        --deploy-hook /usr/local/lib/singlewriter/deploy-hook.py
