"""Study tokens: one unguessable 64-character key per study, for patients who have no account.

A token is derived, not stored: ``HMAC-SHA512(token key, study UID + generation)`` written in 64
characters of ``[A-Za-z0-9]`` (about 381 bits). The token key lives in the data directory's secrets
(or the environment), never in the database; the database keeps a SHA-256 of each token to find it
and what the admin needs to see (who, which study, issued, used). So:

- the same study shows the same token every time, on every instance, until it is revoked;
- revoking moves the study to its next generation: a new token, and the old link dies;
- a copy of the database alone does not give a working link.

A token works from issue until its study date plus the site's accessibility period. A study whose
date is missing, malformed or in the future counts as dated on the day its token was first issued,
so nobody can make an eternal link by uploading a study dated 2999. An admin can extend a token.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

import sqlalchemy as sa

from control import db

TOKEN_LENGTH = 64
ALPHABET = string.ascii_letters + string.digits
# The birth-date question: IDENTITY_ATTEMPTS wrong answers lock the link, for longer each time
# (IDENTITY_LOCKS); the lock after the last of those holds it until an admin releases it. So a
# leaked link gives 15 guesses in all, against a year of dates in a day with a fixed lock.
IDENTITY_ATTEMPTS = 5
IDENTITY_LOCKS = (dt.timedelta(minutes=15), dt.timedelta(hours=2))


def derive_token(token_key: str, study_uid: str, generation: int) -> str:
    """The token of ``study_uid`` at ``generation``: 64 base-62 characters of an HMAC-SHA512."""
    digest = hmac.new(token_key.encode(), f"study-token:{study_uid}:{generation}".encode(), hashlib.sha512)
    number = int.from_bytes(digest.digest(), "big")
    characters = []
    for _ in range(TOKEN_LENGTH):
        number, index = divmod(number, len(ALPHABET))
        characters.append(ALPHABET[index])
    return "".join(characters)


def lookup_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(text: str) -> bool:
    return len(text) == TOKEN_LENGTH and all(character in ALPHABET for character in text)


@dataclass(frozen=True)
class StudyFacts:
    """What the token store keeps of a study (from Orthanc's index)."""

    study_uid: str
    orthanc_study_id: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    study_date: str  # DICOM DA (YYYYMMDD), possibly empty or malformed


def effective_study_date(study_date: str, today: dt.date) -> dt.date:
    """The date validity counts from: the study's own, unless missing, malformed or in the future."""
    text = study_date.strip()
    try:
        # strptime alone would take "2026031" as the first of March: a DICOM date has 8 digits.
        if len(text) != 8 or not text.isdigit():
            raise ValueError(text)
        parsed = dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return today
    return parsed if parsed <= today else today


class TokenState(enum.Enum):
    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class StudyToken:
    """A token's row, with the token itself when the caller is allowed to know it."""

    row: sa.Row
    token: str | None = None

    @property
    def id(self) -> int:
        return self.row.id

    @property
    def public_id(self) -> str:
        return self.row.public_id

    def accessible_until(self, token_days: int) -> dt.date:
        """The last day the link works."""
        return self.row.extended_until or self.row.study_date + dt.timedelta(days=token_days)

    def state(self, token_days: int, today: dt.date) -> TokenState:
        if self.row.revoked_at is not None:
            return TokenState.REVOKED
        if today > self.accessible_until(token_days):
            return TokenState.EXPIRED
        return TokenState.VALID

    def identity_locked(self, now: dt.datetime) -> bool:
        """Whether the birth-date question is closed now: locked for a while, or held."""
        return self.identity_held or (
            self.row.identity_locked_until is not None and self.row.identity_locked_until > now
        )

    @property
    def identity_held(self) -> bool:
        """Held after repeated locks: only an admin's release opens the question again."""
        return self.row.identity_held_at is not None


@dataclass(frozen=True)
class KnownToken(StudyToken):
    """A token whose text is known: the one ``issue`` makes or copies, or the one a patient presents."""

    token: str


def _active_row(connection: sa.Connection, orthanc_study_id: str) -> sa.Row | None:
    """The live token of one study of one patient: the archive's study, not its UID, which another
    patient's study can share (control.tokens.shared)."""
    return connection.execute(
        sa.select(db.study_tokens).where(
            db.study_tokens.c.orthanc_study_id == orthanc_study_id, db.study_tokens.c.revoked_at.is_(None)
        )
    ).first()


def issue(
    connection: sa.Connection, token_key: str, study: StudyFacts, now: dt.datetime
) -> tuple[KnownToken, bool]:
    """The study's current token, made on first request; also says whether it was new.

    Generations count per Study Instance UID, across the archive's studies that have held it, so
    that a token is never made twice.
    """
    row = _active_row(connection, study.orthanc_study_id)
    if row is not None:
        return KnownToken(row, derive_token(token_key, row.study_uid, row.generation)), False
    last = connection.execute(
        sa.select(sa.func.max(db.study_tokens.c.generation)).where(
            db.study_tokens.c.study_uid == study.study_uid
        )
    ).scalar()
    generation = (last or 0) + 1
    token = derive_token(token_key, study.study_uid, generation)
    try:
        # Two instances may issue the first token of a study at once; the loser reads the winner's.
        with connection.begin_nested():
            inserted = _insert(connection, study, generation, token, now)
    except sa.exc.IntegrityError:
        row = _active_row(connection, study.orthanc_study_id)
        if row is None:
            raise  # the clash was not with another token of this study
        return KnownToken(row, derive_token(token_key, row.study_uid, row.generation)), False
    return KnownToken(inserted, token), True


def _insert(
    connection: sa.Connection, study: StudyFacts, generation: int, token: str, now: dt.datetime
) -> sa.Row:
    return connection.execute(
        db.study_tokens.insert()
        .values(
            public_id=secrets.token_hex(6),
            study_uid=study.study_uid,
            orthanc_study_id=study.orthanc_study_id,
            generation=generation,
            lookup_hash=lookup_hash(token),
            patient_name=study.patient_name[:200],
            patient_id=study.patient_id[:100],
            patient_birth_date=study.patient_birth_date[:8],
            study_date=effective_study_date(study.study_date, now.date()),
            issued_at=now,
        )
        .returning(*db.study_tokens.c)
    ).one()


def find(connection: sa.Connection, token: str) -> KnownToken | None:
    """The row of a presented token, whatever its state; None for anything unknown."""
    if not looks_like_token(token):
        return None
    wanted = lookup_hash(token)
    row = connection.execute(
        sa.select(db.study_tokens).where(db.study_tokens.c.lookup_hash == wanted)
    ).first()
    if row is None or not hmac.compare_digest(row.lookup_hash, wanted):
        return None
    return KnownToken(row, token)


def reread(connection: sa.Connection, token: StudyToken) -> StudyToken:
    """The row of ``token`` as it stands now (an answer of the patient's changed it)."""
    return StudyToken(
        connection.execute(sa.select(db.study_tokens).where(db.study_tokens.c.id == token.id)).one()
    )


def get(connection: sa.Connection, token_id: int) -> StudyToken | None:
    row = connection.execute(sa.select(db.study_tokens).where(db.study_tokens.c.id == token_id)).first()
    return StudyToken(row) if row else None


def record_use(connection: sa.Connection, token_id: int, client_address: str, now: dt.datetime) -> None:
    connection.execute(
        db.study_tokens.update()
        .where(db.study_tokens.c.id == token_id)
        .values(uses=db.study_tokens.c.uses + 1, last_used_at=now, last_used_from=client_address)
    )


def revoke(connection: sa.Connection, token_id: int, now: dt.datetime) -> None:
    connection.execute(
        db.study_tokens.update()
        .where(db.study_tokens.c.id == token_id, db.study_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def revoke_patient(connection: sa.Connection, patient_id: str, now: dt.datetime) -> int:
    """Revoke every live link to the patient's studies; return how many."""
    result = connection.execute(
        db.study_tokens.update()
        .where(db.study_tokens.c.patient_id == patient_id, db.study_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return result.rowcount


def extend(connection: sa.Connection, token_id: int, until: dt.date) -> None:
    connection.execute(
        db.study_tokens.update().where(db.study_tokens.c.id == token_id).values(extended_until=until)
    )


class IdentityAnswer(enum.Enum):
    """What one answer to the birth-date question did."""

    ACCEPTED = "accepted"
    WRONG = "wrong"
    LOCKED = "locked"  # this wrong answer locked the link for a while
    HELD = "held"  # this wrong answer held the link until an admin releases it
    CLOSED = "closed"  # the question was closed already: the answer was not looked at


def identity_answer(
    connection: sa.Connection, token_id: int, correct: bool, now: dt.datetime
) -> IdentityAnswer:
    """Count an answer to the birth-date question, and lock or hold the link when it is one too many.

    Each answer is counted in the database itself (one UPDATE that adds one, only while the question
    is open), so answers sent at once cannot all be counted as the first, and none is looked at
    once the link is locked.
    """
    table = db.study_tokens
    question_open = sa.and_(
        table.c.id == token_id,
        table.c.identity_held_at.is_(None),
        sa.or_(table.c.identity_locked_until.is_(None), table.c.identity_locked_until <= now),
    )
    if correct:
        reset = table.update().where(question_open).values(identity_failures=0, identity_locks=0)
        return IdentityAnswer.ACCEPTED if connection.execute(reset).rowcount else IdentityAnswer.CLOSED
    counted = table.update().where(question_open).values(identity_failures=table.c.identity_failures + 1)
    if not connection.execute(counted).rowcount:
        return IdentityAnswer.CLOSED
    row = connection.execute(
        sa.select(table.c.identity_failures, table.c.identity_locks).where(table.c.id == token_id)
    ).one()
    if row.identity_failures < IDENTITY_ATTEMPTS:
        return IdentityAnswer.WRONG
    locks = row.identity_locks + 1
    values: dict = {"identity_failures": 0, "identity_locks": locks}
    if locks > len(IDENTITY_LOCKS):
        values.update(identity_held_at=now, identity_locked_until=None)
        outcome = IdentityAnswer.HELD
    else:
        values.update(identity_locked_until=now + IDENTITY_LOCKS[locks - 1])
        outcome = IdentityAnswer.LOCKED
    connection.execute(table.update().where(table.c.id == token_id).values(**values))
    return outcome


def release_identity(connection: sa.Connection, token_id: int) -> None:
    """An admin opens the birth-date question again, with a fresh count."""
    connection.execute(
        db.study_tokens.update()
        .where(db.study_tokens.c.id == token_id)
        .values(identity_failures=0, identity_locks=0, identity_locked_until=None, identity_held_at=None)
    )


def count_held(connection: sa.Connection) -> int:
    """How many live links are held after repeated wrong birth dates."""
    table = db.study_tokens
    return connection.execute(
        sa.select(sa.func.count())
        .select_from(table)
        .where(table.c.identity_held_at.is_not(None), table.c.revoked_at.is_(None))
    ).scalar_one()


def list_tokens(
    connection: sa.Connection, *, patient_id: str = "", held: bool = False, offset: int = 0, limit: int = 50
):
    query = sa.select(db.study_tokens).order_by(
        db.study_tokens.c.issued_at.desc(), db.study_tokens.c.id.desc()
    )
    if patient_id:
        query = query.where(db.study_tokens.c.patient_id == patient_id)
    if held:
        query = query.where(
            db.study_tokens.c.identity_held_at.is_not(None), db.study_tokens.c.revoked_at.is_(None)
        )
    total = connection.execute(
        sa.select(sa.func.count()).select_from(query.order_by(None).subquery())
    ).scalar_one()
    return total, [StudyToken(row) for row in connection.execute(query.offset(offset).limit(limit))]
