# The compose test's mail catcher (stands in for axllent/mailpit, which no
# registry here serves): aiosmtpd keeping each message as a file in the
# Maildir /mail. Built by tests/test_image.py on the same base as the image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG AIOSMTPD=aiosmtpd
RUN python3 -m venv /opt/mail \
    && /opt/mail/bin/pip install --no-cache-dir --disable-pip-version-check "${AIOSMTPD}" \
    && useradd --uid 10002 mail-catcher \
    && mkdir -p /mail/tmp /mail/new /mail/cur && chown -R mail-catcher /mail
USER mail-catcher
EXPOSE 1025
# aiosmtpd stops on Ctrl-C; as PID 1 it would ignore SIGTERM.
STOPSIGNAL SIGINT
CMD ["/opt/mail/bin/python", "-m", "aiosmtpd", "-n", "-l", "0.0.0.0:1025", \
     "-c", "aiosmtpd.handlers.Mailbox", "/mail"]
