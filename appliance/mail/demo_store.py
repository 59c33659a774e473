"""Demo data for the message store: months of realistic mail, a million messages in seconds.

The demo and the benchmarks need a store that looks like a busy appliance's; :func:`fill_demo`
writes it, in whichever format the store is in.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import random
import sqlite3
import string
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.mail.eicar import EICAR
from appliance.mail.msgstore import (
    BODY_CODEC,
    FORMAT_2_8_1,
    FORMAT_VERSION,
    compress_body,
    connect,
    connection_format,
    create,
    create_indexes,
    drop_indexes,
    format_version,
    split_status,
)
from appliance.system.paths import layout

DEMO_STORES = (
    # (name, retention_days, verdict it receives, share of the mail that lands in it)
    ("Spam quarantine", 30, "spam", 0.64),
    ("Virus quarantine", 90, "virus", 0.04),
    ("Policy violations", 60, "policy", 0.10),
    ("Archive", 14, "clean", 0.22),
)

_HISTORY_DAYS = 90
_BATCH = 25_000

_FIRST_NAMES = (
    "anna", "ben", "carla", "david", "elena", "frank", "grace", "henry", "irene", "jack",
    "karin", "lars", "maria", "nils", "olga", "peter", "quinn", "rosa", "stefan", "tanja",
    "uwe", "vera", "walter", "yusuf", "zoe", "amir", "bianca", "chen", "dmitri", "emma",
    "fatima", "george", "hana", "ivan", "julia", "kenji", "lucia", "mohamed", "nora", "oscar",
)  # fmt: skip

_LAST_NAMES = (
    "schmidt", "mueller", "rossi", "garcia", "smith", "johnson", "nguyen", "kowalski",
    "jansen", "dubois", "silva", "novak", "larsen", "tanaka", "kim", "weber", "meyer",
    "fischer", "moreau", "bianchi", "lopez", "brown", "wilson", "taylor", "hoffmann",
    "becker", "wagner", "schulz", "keller", "richter",
)  # fmt: skip

_ROLE_MAILBOXES = ("sales", "support", "info", "hr", "finance", "purchasing", "it-helpdesk")

_INTERNAL_DOMAINS = ("example.com", "eu.example.com")

_PARTNER_DOMAINS = (
    "partner.example.net", "supplier.example.org", "logistics.example", "lawfirm.example",
    "bank.example", "travel.example", "cloudvendor.example", "consulting.example.net",
    "university.example.edu", "news.example.net",
)  # fmt: skip

_SPAM_DOMAINS = (
    "cheap-meds.test", "lucky-winner.test", "promo-deals.test", "crypto-profit.test",
    "dating-match.test", "replica-watches.test", "loan-approval.test", "seo-rank.test",
)  # fmt: skip

_VIRUS_SENDERS = (
    "invoice@billing-dept.test", "noreply@parcel-tracking.test", "scanner@mfp-office.test",
    "payroll@payroll-update.test", "voicemail@unified-msg.test", "accounts@example.com",
    "orders@supplier-portal.test", "security@account-verify.test",
)  # fmt: skip

_SUBJECTS = {
    "spam": (
        "You have won a {money} prize", "Cheap meds - {pct}% off today only",
        "Re: your account verification", "Make {money} a week from home",
        "Limited offer: replica watches {pct}% off", "Your crypto wallet is ready",
        "URGENT: business proposal", "Lose {num} kg in two weeks", "Exclusive deal for {first}",
        "Pre-approved loan of {money}", "Get to page one of Google in {num} days",
        "{first}, someone viewed your profile",
    ),
    "virus": (
        "Invoice {num} overdue", "DHL shipment notification {num}",
        "Scanned document from MFP-{num}", "Payroll update - action required",
        "Voicemail message ({num} sec)", "Order confirmation #{num}",
        "Your account has been suspended", "Remittance advice {num}",
    ),
    "policy": (
        "Q{q} financial results - CONFIDENTIAL", "Customer list export {num}",
        "Salary review {year}", "Site photos (large attachment)", "Project Falcon design documents",
        "FW: contract draft v{q}", "Board minutes {year}-{q}", "Password list for the new servers",
    ),
    "clean": (
        "Meeting notes {year}-{q}", "Re: quarterly review", "Weekly newsletter #{num}",
        "Your order #{num} has shipped", "Lunch on Friday?", "Updated timesheet",
        "Re: support ticket #{num}", "Travel booking confirmation {num}",
        "Invitation: project kick-off", "Re: Re: budget {year}",
    ),
}  # fmt: skip

_TEXT_BODIES = {
    "spam": (
        "Dear friend,\r\n\r\nCongratulations! Your e-mail address was selected in our annual "
        "draw. To claim your prize reply with your full name, address and bank details.\r\n",
        "Best prices online! No prescription needed. Discreet worldwide shipping.\r\n"
        "Order now and save up to 80%.\r\n\r\nTo unsubscribe reply with REMOVE.\r\n",
        "Hello,\r\n\r\nI am a banker and I have a confidential business proposal of mutual "
        "benefit. Kindly reply for more details.\r\n\r\nRegards,\r\nMr. B. Okoro\r\n",
    ),
    "virus": (
        "Please find attached the invoice for your recent order. Payment is overdue; open the "
        "attached document to avoid late fees.\r\n",
        "Your parcel could not be delivered. Print the attached label and take it to the "
        "nearest office.\r\n",
    ),
    "policy": (
        "Hi,\r\n\r\nAttached are the figures we discussed. CONFIDENTIAL: please do not forward "
        "outside the company.\r\n\r\nThanks\r\n",
        "As requested, the full customer list export is attached. Let me know if you need more "
        "columns.\r\n",
    ),
    "clean": (
        "Hi all,\r\n\r\nThanks for joining today. Action items are below; please update the "
        "tracker by Friday.\r\n\r\n- finish the migration plan\r\n- book the review room\r\n",
        "Hello,\r\n\r\nYour order has been dispatched and will arrive within 3-5 working days."
        "\r\n\r\nKind regards,\r\nCustomer Service\r\n",
        "Sounds good, see you at 12:30 in the usual place.\r\n",
    ),
}  # fmt: skip

_ATTACHMENTS = {
    "spam": (("offer.html", "text/html"),),
    "virus": (
        ("invoice_0419.zip", "application/zip"),
        ("label.pdf.exe", "application/octet-stream"),
        ("document.docm", "application/vnd.ms-word.document.macroEnabled.12"),
    ),
    "policy": (
        ("customers.csv", "text/csv"),
        ("results-q3.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ("site-photo.jpg", "image/jpeg"),
    ),
    "clean": (("agenda.pdf", "application/pdf"), ("timesheet.xlsx", "application/octet-stream")),
}

# Bytes of attachment before base64: a few hundred bytes to a few KB per message in all.
_ATTACHMENT_SIZES = (200, 900, 400, 2000, 600)


def _body_templates(rng: random.Random) -> dict[str, list[bytes]]:
    """Bodies (MIME headers onward) per verdict: a few dozen, a few hundred bytes to a few KB.

    Built once per fill; the per-message headers are prepended, so a million messages cost a
    million string joins rather than a million MIME serialisations.
    """
    templates: dict[str, list[bytes]] = {}
    for verdict, texts in _TEXT_BODIES.items():
        variants = []
        sizes = itertools.cycle(_ATTACHMENT_SIZES)
        for index, text in enumerate(texts):
            plain = (
                "Content-Type: text/plain; charset=us-ascii\r\n"
                "Content-Transfer-Encoding: 7bit\r\n\r\n" + text
            )
            if verdict != "virus":  # a virus comes as an attachment
                variants.append(plain.encode("ascii"))
            for filename, content_type in _ATTACHMENTS[verdict]:
                boundary = f"----=_Part_{index}_{rng.randrange(10**9, 10**10)}"
                payload = rng.randbytes(next(sizes))
                if verdict == "virus":  # what the mail service finds: the EICAR test file
                    payload = EICAR + payload
                encoded = base64.encodebytes(payload).decode("ascii").replace("\n", "\r\n")
                multipart = (
                    f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
                    "This is a multi-part message in MIME format.\r\n\r\n"
                    f"--{boundary}\r\n"
                    "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                    f"{text}\r\n"
                    f"--{boundary}\r\n"
                    f'Content-Type: {content_type}; name="{filename}"\r\n'
                    "Content-Transfer-Encoding: base64\r\n"
                    f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'
                    f"{encoded}\r\n"
                    f"--{boundary}--\r\n"
                )
                variants.append(multipart.encode("ascii"))
        templates[verdict] = variants
    return templates


def _subjects(rng: random.Random, verdict: str, count: int, year: int) -> list[str]:
    patterns = _SUBJECTS[verdict]
    subjects = []
    for _ in range(count):
        subjects.append(
            rng.choice(patterns).format(
                money=f"${rng.choice((500, 1000, 5000, 25000, 1000000)):,}",
                pct=rng.choice((50, 70, 80, 90)),
                num=rng.randrange(100, 99999),
                first=rng.choice(_FIRST_NAMES).title(),
                q=rng.randrange(1, 5),
                year=rng.choice((year - 1, year)),
            )
        )
    return subjects


def _people(rng: random.Random, domains: tuple[str, ...], count: int) -> list[str]:
    people = set()
    while len(people) < count:
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}"))
        people.add(f"{local}@{rng.choice(domains)}")
    return sorted(people)


def _spammers(rng: random.Random, count: int) -> list[str]:
    alphabet = string.ascii_lowercase + string.digits
    locals_ = ("offers", "noreply", "winner", "info", "deals", "newsletter", "support")
    senders = []
    for _ in range(count):
        if rng.random() < 0.5:
            local = rng.choice(locals_)
        else:
            local = "".join(rng.choices(alphabet, k=rng.randrange(5, 11)))
        senders.append(f"{local}@{rng.choice(_SPAM_DOMAINS)}")
    return senders


def _day_prefix(day: int) -> str:
    """``"Tue, 03 Sep 2013 "`` for a day number since the epoch (RFC 5322 date, English)."""
    return datetime.fromtimestamp(day * 86400, tz=UTC).strftime("%a, %d %b %Y ")


def fill_demo(
    root: Path | None = None,
    *,
    messages: int,
    seed: int = 2880,
    now: datetime | None = None,
) -> None:
    """Add ``messages`` realistic messages, with an SMTP log row each, a tracking row a recipient.

    The demo and the benchmarks need a store that looks like a busy appliance's: four stores
    with their own retention, each holding mail no older than its retention, denser towards
    ``now``; realistic senders, subjects, sizes and verdicts. The same ``seed`` and ``now``
    give the same rows, so tests can compare.

    Built for a million messages in seconds: batches generated from precomputed templates go
    in with ``executemany``, all in one transaction; the tracking log is derived from the
    inserted messages inside SQLite; for the load only, the journal is kept in memory and
    syncing is off, and (when the load outweighs what is already there) the secondary indexes
    are dropped and built once at the end. A crash in the middle can therefore damage the
    store, which is acceptable for demo data only.
    """
    if messages < 0:
        raise ValueError("messages must not be negative")
    # A store the upgrade already converted is filled in its own format.
    version = format_version(root) if layout(root).msgstore_db.is_file() else FORMAT_VERSION
    create(root, format_version=version)
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    now_ts = int(now.timestamp())

    conn = connect(root)
    try:
        # Journal and sync settings only change outside a transaction.
        conn.execute("PRAGMA foreign_keys = OFF")  # the generated rows are consistent
        conn.execute("PRAGMA journal_mode = MEMORY")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB, for the index builds
        conn.execute("PRAGMA threads = 2")  # sorter helpers for the index builds
        conn.execute("BEGIN IMMEDIATE")
        try:
            _load(conn, random.Random(seed), messages, now_ts)  # noqa: S311 - demo data
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA analysis_limit = 400")
        conn.execute("ANALYZE")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


@dataclass
class _Pools:
    """What the generator draws from, per verdict in ``DEMO_STORES`` order."""

    verdicts: list[str]
    store_ids: list[int]
    window: list[int]  # seconds of history each store keeps
    verdict_table: list[int]  # verdict indexes in proportion to their share of the mail
    senders: list[list[str]]
    recipients: list[list[str]]
    subjects: list[list[str]]
    bodies: list[list[bytes]]
    client_ips: list[list[str]]


def _pools(rng: random.Random, store_ids: dict[str, int], now_ts: int) -> _Pools:
    verdicts = [verdict for _, _, verdict, _ in DEMO_STORES]
    verdict_table: list[int] = []
    for index, (_, _, _, share) in enumerate(DEMO_STORES):
        verdict_table += [index] * round(share * 100)
    staff = _people(rng, _INTERNAL_DOMAINS, 300) + [
        f"{role}@example.com" for role in _ROLE_MAILBOXES
    ]
    partners = _people(rng, _PARTNER_DOMAINS, 400)
    templates = _body_templates(rng)
    year = datetime.fromtimestamp(now_ts, tz=UTC).year
    # Documentation address ranges only: the internet side is 203.0.113.0/24; the groupware
    # servers that relay outgoing mail sit on eth1's network, 198.51.100.0/24.
    external_ips = [f"203.0.113.{n}" for n in range(2, 255)]
    internal_ips = ["198.51.100.20", "198.51.100.21", "198.51.100.22"]
    return _Pools(
        verdicts=verdicts,
        store_ids=[store_ids[name] for name, _, _, _ in DEMO_STORES],
        window=[min(days, _HISTORY_DAYS) * 86400 for _, days, _, _ in DEMO_STORES],
        verdict_table=verdict_table,
        # Spam from throwaway senders, viruses from a few spoofed ones, policy violations
        # from staff writing out to partners, clean archived mail from partners to staff.
        senders=[_spammers(rng, 1000), list(_VIRUS_SENDERS), staff, partners],
        recipients=[staff, staff, partners, staff],
        subjects=[_subjects(rng, verdict, 150, year) for verdict in verdicts],
        bodies=[templates[verdict] for verdict in verdicts],
        client_ips=[external_ips, external_ips, internal_ips, external_ips],
    )


def _receive_times(rng: random.Random, pools: _Pools, messages: int, now_ts: int) -> list[int]:
    """Sorted ``received_at << 2 | verdict`` keys, so ids grow with time as in a real store.

    Packing both into one int makes the sort of a million keys cheap (no tuples).
    """
    rand = rng.random
    sqrt = math.sqrt
    table = pools.verdict_table
    window = pools.window
    keys = []
    for _ in range(messages):
        verdict = table[int(rand() * len(table))]
        # Density falls linearly from now to the end of the window: recent days are busier.
        age = int(window[verdict] * (1.0 - sqrt(1.0 - rand())))
        keys.append((now_ts - age) << 2 | verdict)
    keys.sort()
    return keys


_Batch = tuple[list[tuple[object, ...]], list[tuple[int, bytes]], list[tuple[object, ...]]]


def _batches(rng: random.Random, pools: _Pools, keys: list[int], first_id: int) -> Iterator[_Batch]:
    """Yield (message rows, raw rows, SMTP log rows) for the messages, ``_BATCH`` at a time.

    The hot loop of the fill: everything per verdict is unpacked from one tuple, times of day
    are formatted once each, and each choice is a single ``random()`` call.
    """
    rand = rng.random
    per_verdict = [
        (
            pools.verdicts[v],
            pools.store_ids[v],
            pools.senders[v],
            [sender.partition("@")[2] for sender in pools.senders[v]],
            len(pools.senders[v]),
            pools.recipients[v],
            len(pools.recipients[v]),
            pools.subjects[v],
            len(pools.subjects[v]),
            pools.bodies[v],
            len(pools.bodies[v]),
            pools.client_ips[v],
            len(pools.client_ips[v]),
        )
        for v in range(len(pools.verdicts))
    ]
    day_prefixes: dict[int, str] = {}
    clock: dict[int, str] = {}  # seconds of the day -> "HH:MM:SS +0000", filled as needed
    for start in range(0, len(keys), _BATCH):
        message_rows: list[tuple[object, ...]] = []
        raw_rows: list[tuple[int, bytes]] = []
        smtp_rows: list[tuple[object, ...]] = []
        for msg_id, key in enumerate(keys[start : start + _BATCH], start=first_id + start):
            received_at = key >> 2
            (
                verdict,
                store_id,
                senders,
                sender_domains,
                n_senders,
                recipients,
                n_recipients,
                subjects,
                n_subjects,
                bodies,
                n_bodies,
                client_ips,
                n_client_ips,
            ) = per_verdict[key & 3]
            pick = int(rand() * n_senders)
            sender = senders[pick]
            recipient = recipients[int(rand() * n_recipients)]
            extra = rand()
            if extra < 0.15:
                all_recipients = recipient + ", " + recipients[int(rand() * n_recipients)]
                if extra < 0.05:
                    all_recipients += ", " + recipients[int(rand() * n_recipients)]
            else:
                all_recipients = recipient
            subject = subjects[int(rand() * n_subjects)]
            body = bodies[int(rand() * n_bodies)]
            client_ip = client_ips[int(rand() * n_client_ips)]
            day, seconds = divmod(received_at, 86400)
            prefix = day_prefixes.get(day)
            if prefix is None:
                prefix = day_prefixes[day] = _day_prefix(day)
            time_of_day = clock.get(seconds)
            if time_of_day is None:
                hour, minute, second = seconds // 3600, seconds // 60 % 60, seconds % 60
                time_of_day = clock[seconds] = f"{hour:02d}:{minute:02d}:{second:02d} +0000"
            date = prefix + time_of_day
            queue_id = f"{(received_at * 7919 + msg_id * 104729) & 0xFFFFFFFFFF:010X}"
            message_id = f"<{received_at:x}.{msg_id:x}@{sender_domains[pick]}>"
            raw = (
                f"Return-Path: <{sender}>\r\n"
                f"Received: from [{client_ip}] ({client_ip})\r\n"
                f"\tby mailsec01.example.com with ESMTP id {queue_id}\r\n"
                f"\tfor <{recipient}>; {date}\r\n"
                f"From: {sender}\r\nTo: {all_recipients}\r\nSubject: {subject}\r\n"
                f"Date: {date}\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
            ).encode("ascii") + body
            # Half the viruses are refused at the end of DATA (a copy is still stored); the
            # tracking log derives its action with the same rule, see _TRACKING_FROM_MESSAGES.
            if verdict == "virus" and msg_id % 2 == 0:
                response = "554 5.7.1 Message rejected: a virus was found in the message"
            else:
                response = "250 2.0.0 Ok: queued as " + queue_id
            message_rows.append(
                (
                    msg_id,
                    store_id,
                    received_at,
                    message_id,
                    sender,
                    all_recipients,
                    subject,
                    len(raw),
                    verdict,
                )
            )
            raw_rows.append((msg_id, raw))
            smtp_rows.append((received_at, client_ip, sender, recipient, response))
        yield message_rows, raw_rows, smtp_rows


# One tracking log row per recipient of each generated message, as the mail service writes
# them: derived in SQLite from the message rows (the same facts, and much cheaper than binding
# them all again from Python). A demo message has one to three recipients, joined by ", ";
# the rows of one message follow each other, in the order of its recipients.
_TRACKING_FROM_MESSAGES = """
INSERT INTO tracking_log (logged_at, message_id, sender, recipient, subject, verdict, action,
                          size, quarantine_id)
WITH split AS (
    SELECT id, 1 AS position, recipients || ', ' AS rest FROM quarantined_message WHERE id >= ?
    UNION ALL
    SELECT id, position + 1, substr(rest, instr(rest, ', ') + 2) FROM split
    WHERE instr(substr(rest, instr(rest, ', ') + 2), ', ') > 0
)
SELECT m.received_at, m.message_id, m.sender, substr(s.rest, 1, instr(s.rest, ', ') - 1),
       m.subject, m.verdict,
       CASE WHEN m.verdict = 'clean' THEN 'delivered'
            WHEN m.verdict = 'virus' AND m.id % 2 = 0 THEN 'rejected'
            ELSE 'quarantined' END,
       m.size, m.id
FROM split AS s JOIN quarantined_message AS m ON m.id = s.id
ORDER BY s.id, s.position
"""


def _load(conn: sqlite3.Connection, rng: random.Random, messages: int, now_ts: int) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO message_store (name, retention_days) VALUES (?, ?)",
        [(name, days) for name, days, _, _ in DEMO_STORES],
    )
    store_ids = dict(conn.execute("SELECT name, id FROM message_store").fetchall())
    (existing,) = conn.execute("SELECT count(*) FROM quarantined_message").fetchone()
    (last_id,) = conn.execute("SELECT coalesce(max(id), 0) FROM quarantined_message").fetchone()
    rebuild = messages > existing
    if rebuild:
        drop_indexes(conn)

    version = connection_format(conn)
    pools = _pools(rng, store_ids, now_ts)
    keys = _receive_times(rng, pools, messages, now_ts)
    for message_rows, raw_rows, smtp_rows in _batches(rng, pools, keys, last_id + 1):
        conn.executemany(
            "INSERT INTO quarantined_message (id, store_id, received_at, message_id,"
            " sender, recipients, subject, size, verdict)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            message_rows,
        )
        if version == FORMAT_2_8_1:
            conn.executemany(
                "INSERT INTO message_body (message_id, codec, raw_size, sha256, body)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        msg_id,
                        BODY_CODEC,
                        len(raw),
                        hashlib.sha256(raw).digest(),
                        compress_body(raw),
                    )
                    for msg_id, raw in raw_rows
                ],
            )
            conn.executemany(
                "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, status, response)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(*row[:4], *split_status(str(row[4]))) for row in smtp_rows],
            )
        else:
            conn.executemany(
                "INSERT INTO quarantined_message_raw (message_id, raw) VALUES (?, ?)", raw_rows
            )
            conn.executemany(
                "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
                " VALUES (?, ?, ?, ?, ?)",
                smtp_rows,
            )
    conn.execute(_TRACKING_FROM_MESSAGES, (last_id + 1,))

    if rebuild:
        create_indexes(conn)
