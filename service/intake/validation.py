"""What a submit may ask for. Each check raises InvalidInput with a sentence
the user can act on; the handler turns it into a 400."""

from __future__ import annotations

import re
import urllib.parse

from email_validator import EmailNotValidError, validate_email

from service.fetch import ftp
from service.fetch.netpolicy import AddressPolicy, parse_ip_literal
from service.model.digests import Checksum, DigestSpecError, parse_algorithms, parse_expected
from service.model.numbers import whole_number

MAX_URL_LENGTH = 2048
MAX_EMAIL_LENGTH = 254
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_EXPECTED_LENGTH = 300
# What a download may fetch (a webhook is http(s) only).
DOWNLOAD_SCHEMES = ("http", "https", *ftp.SCHEMES)


# One C-level scan: a per-character Python loop cost a millisecond per long
# URL, ten seconds of IOLoop for a maximal manifest.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidInput(ValueError):
    pass


def _no_controls(name: str, value: str) -> None:
    if _CONTROL.search(value):
        raise InvalidInput(f"{name} must not contain control characters (NUL, CR, LF, tab...)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON "\\ud800") cannot be stored, and one such
        # document would fail the whole batched insert it joined.
        raise InvalidInput(f"{name} is not valid Unicode: it contains a lone surrogate "
                           "such as \\ud800") from None


def check_url(url: str | None, policy: AddressPolicy, name: str = "url",
              schemes: tuple[str, ...] = DOWNLOAD_SCHEMES) -> str:
    if url is None:
        raise InvalidInput(f"{name} is required")
    url = ftp.with_scheme(url.strip(" ")) if "ftp" in schemes else url.strip(" ")
    if not url:
        raise InvalidInput(f"{name} is empty")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"{name} is longer than {MAX_URL_LENGTH} characters")
    _no_controls(name, url)
    if " " in url:
        raise InvalidInput(f"{name} must not contain spaces (percent-encode them as %20)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"{name} is malformed: {exc}") from None
    if parts.scheme.lower() not in schemes:
        raise InvalidInput(f"{name} must start with {_listed(schemes)}")
    if not parts.hostname:
        raise InvalidInput(f"{name} has no host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInput(f"{name} must not contain a user name or password")
    if port == 0:
        raise InvalidInput(f"{name} has an invalid port")
    ftp_path = ftp.path_problem(parts.path) if parts.scheme.lower() in ftp.SCHEMES else None
    if ftp_path:
        raise InvalidInput(f"{name}: an FTP path {ftp_path}")
    ip = parse_ip_literal(parts.hostname)
    if ip is not None and not policy.allows(ip):
        raise InvalidInput(f"{name} points to {ip}, a private or reserved address "
                           "that this service does not fetch from")
    return url


def _listed(schemes: tuple[str, ...]) -> str:
    names = [f"{s}://" for s in schemes]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_callback_url(url: str | None, policy: AddressPolicy,
                       signing: bool) -> str | None:
    """A webhook's address, under a download's rules: http(s), no
    credentials, no blocked IP literal. The address a name resolves to is
    checked when the webhook is sent, as a download's is when it is fetched."""
    if url is None or url.strip() == "":
        return None
    if not signing:
        raise InvalidInput("callback_url is not available on this service: it has no "
                           "WEBHOOK_SECRET to sign webhooks with")
    return check_url(url, policy, name="callback_url", schemes=("http", "https"))


def check_email(email: str | None) -> str | None:
    if email is None or email.strip() == "":
        return None
    email = email.strip()
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidInput(f"email is longer than {MAX_EMAIL_LENGTH} characters")
    _no_controls("email", email)
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidInput(f"email is not valid: {exc}") from None


# A result older than a year is not a cache hit anyone should rely on.
MAX_AGE_LIMIT = 365 * 86400


def check_max_age(value: str | None) -> int:
    """``max_age``: how old (in whole seconds) a result of an earlier
    download of the same file may be to answer this submit; 0, the
    default, downloads again."""
    if value is None or value == "":
        return 0
    if whole_number(value) is None:
        raise InvalidInput(f"max_age must be a whole number of seconds, like 3600 "
                           f"(got {value[:40]!r})")
    seconds = int(value)
    if seconds > MAX_AGE_LIMIT:
        raise InvalidInput(f"max_age may be at most {MAX_AGE_LIMIT} seconds (a year)")
    return seconds


def check_connections(value: str | None, most: int) -> int | None:
    """``connections``: ranged connections for a big file, 1 to ``most``
    (MAX_CONNECTIONS); None: the service's default."""
    if value is None or value == "":
        return None
    number = whole_number(value.strip())
    if number is None or not 1 <= number <= most:
        raise InvalidInput(f"connections must be a whole number from 1 to {most}")
    return number


def check_idempotency_key(key: str | None) -> str | None:
    if key is None or key == "":
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidInput(
            f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    if any(ord(c) < 33 or ord(c) > 126 for c in key):
        raise InvalidInput("Idempotency-Key must be printable ASCII without spaces")
    return key


def check_digests(algorithms: list[str], expected: str | None) -> tuple[list[str],
                                                                      Checksum | None]:
    """The algorithms to compute and the checksum to verify; the expected
    checksum's algorithm is computed whether or not it was listed."""
    checksum = None
    if expected is not None and expected.strip():
        if len(expected) > MAX_EXPECTED_LENGTH:
            raise InvalidInput(f"expected is longer than {MAX_EXPECTED_LENGTH} characters")
        _no_controls("expected", expected)
        try:
            checksum = parse_expected(expected)
        except DigestSpecError as exc:
            raise InvalidInput(f"expected: {exc}") from None
    for value in algorithms:
        _no_controls("algorithms", value)
    try:
        wanted = parse_algorithms(algorithms + ([checksum.algorithm] if checksum else []))
    except DigestSpecError as exc:
        raise InvalidInput(f"algorithms: {exc}") from None
    return wanted, checksum


# Mirrors of one file: more rarely help (the connections are shared among
# them), and each costs a probe before the pieces start.
MAX_MIRRORS = 8
MIRROR_SCHEMES = ("http", "https")


def check_mirrors(values: list[str], url: str, policy: AddressPolicy,
                  name: str = "mirror") -> list[str]:
    """``mirrors``: other URLs of the same file, each under the url's rules
    but http(s) only (pieces are ranged HTTP requests); the url itself and
    repeats are dropped."""
    values = [v for v in values if v is not None and v.strip(" ")]
    if len(values) > MAX_MIRRORS:
        raise InvalidInput(f"at most {MAX_MIRRORS} mirrors may be given ({len(values)} were)")
    mirrors: list[str] = []
    for number, value in enumerate(values, 1):
        mirror = check_url(value, policy, name=f"{name} {number}", schemes=MIRROR_SCHEMES)
        if mirror != url and mirror not in mirrors:
            mirrors.append(mirror)
    return mirrors
