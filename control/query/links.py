"""A study's patient link, for a signed-in user to copy from the study results and send.

The link opens the patient's pages (``control.tokens``); making it is the signed-in user's act,
recorded in the activity log. The first request for a study makes its token, later ones copy it.
"""

from __future__ import annotations

from flask import abort, jsonify, url_for
from flask_login import current_user

from control import db, network, services
from control.activity import Outcome, record_activity
from control.errors import error_response
from control.events import TokenCopiedEvent, TokenMadeEvent
from control.orthanc import OrthancError
from control.query import bp
from control.tokens import NO_BIRTH_DATE, SHARED_UID, shared, store, study_facts, unchecked_link_warning
from control.tokens.periods import LinkPeriod


@bp.post("/tokens/studies/<orthanc_id>/link")
def study_link(orthanc_id: str):
    """The fully qualified link of a study's token, for a signed-in user to copy and send.

    Answers JSON: ``{"link", "token_id", "accessible_until", "expired", "note", "extend_url",
    "new"}``: ``note`` says until when the link works, or that it has expired and would not open
    (the page shows that before anything is copied); ``extend_url`` is the admin's page of the
    link, for admins only. The first request for a study makes its token, so that an expired one is
    there to extend. A study whose UID another patient's study shares gets 409 and no link.
    """
    orthanc = services.archive()
    try:
        facts, _study = study_facts(orthanc, orthanc_id)
    except OrthancError as error:
        if error.status == 404:
            abort(404)
        raise
    holders = shared.holders(orthanc, facts.study_uid)
    if len(holders) > 1:
        with services.engine().begin() as connection:
            shared.flag(connection, orthanc, facts.study_uid, holders, "copy study link")
            record_activity(
                TokenMadeEvent(reason="another patient's study has the same Study Instance UID"),
                Outcome.REFUSED,
                connection=connection,
                patient=facts.patient_name,
                study=facts.study_uid,
            )
        return error_response(409, SHARED_UID)
    warning = unchecked_link_warning(services.settings(), facts)
    with services.engine().begin() as connection:
        token, new = store.issue(connection, services.site().secrets.token_key, facts, db.utcnow())
        record_activity(
            (TokenMadeEvent if new else TokenCopiedEvent)(identity_check=NO_BIRTH_DATE if warning else None),
            connection=connection,
            token_id=token.public_id,
            patient=facts.patient_name,
            study=facts.study_uid,
        )
    period = LinkPeriod(token.accessible_until(services.settings().token_days), db.utcnow().date())
    answer = {
        "link": network.token_link(services.settings(), token.token),
        "token_id": token.public_id,
        "accessible_until": period.until.isoformat(),
        "expired": period.expired,
        "note": period.note(services.settings().date_format),
        "extend_url": url_for("admin.token", token_id=token.id) if current_user.is_admin else None,
        "new": new,
    }
    if warning:
        answer["warning"] = warning
    return jsonify(answer)
