"""The driver app's use cases. Every function is scoped to the signed-in driver's account:
another driver's objects are not found (404), never forbidden."""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from billing import agreements, audit
from billing import notifications as messages
from billing.providers import PlateService, ProviderRejected, ProviderUnavailable
from billing.wechat import WeChatParkingProvider
from parking.auth import repository as auth_repo
from parking.disputes import repository as disputes_repo
from parking.disputes import service as disputes_service
from parking.drivers import repository as repo
from parking.drivers.schemas import (
    Agreement,
    AgreementRequest,
    Binding,
    ChargeView,
    DebtPayment,
    Debts,
    DebtView,
    Export,
    Me,
    NotificationView,
    PlateClaim,
    PlateClaimState,
    Receipt,
    RefundView,
    Stay,
    StayPage,
)
from parking.drivers.verification import VehicleRegistry, licence_ref, same_licence
from parking.errors import AppError, NotFound
from parking.logging import get_logger, pseudonym
from parking.ownership import service as ownership
from parking.payments import service as payments_service
from parking.ratelimit import hit
from parking.runtime import Runtime
from plate_recognition import grammar

log = get_logger(__name__)

# A charge awaiting an operator (or held by a dispute) may take longer than "shortly".
_CHARGES_PENDING = "a parking fee is still being charged or confirmed; try again later"

# Enough for a household's or a small business's cars; more is a fleet, not a driver.
MAX_PLATES_PER_ACCOUNT = 5
# Ownership checks one account may ask the vehicle registry for per hour: a real registry
# must not become an oracle for guessing licence numbers.
PLATE_CLAIMS_PER_HOUR = 10

# What a plate's pay-later service state means at the barrier, for the driver.
SERVICE_NOTES = {
    "normal": "先离场后付费可用：出场自动抬杆，停车费由支付平台（微信支付分停车服务）自动扣除。",
    "paused": "您已在支付平台暂停该车牌的停车服务：出场时需停车扫码缴费；"
    "在微信支付分停车服务中恢复后即可先离场后付费。",
    "overdue": "该车牌的停车服务因在支付平台有欠款而受限：出场时需停车扫码缴费；"
    "还清欠款后自动恢复。",
    "not_opened": "该车牌尚未在支付平台开通停车服务（或开通未通过评估）：出场时需停车扫码缴费；"
    "请先在微信支付分停车服务中开通该车牌。",
}
# Pay-later is on, but the provider has not answered about the plate yet.
SERVICE_UNKNOWN_NOTE = "正在向支付平台查询该车牌的停车服务状态，请稍后刷新。"


@dataclass(frozen=True, slots=True)
class PlateDisputed:
    """The plate is bound to another account: a dispute was opened and the plate stays."""

    dispute_id: int


def _account_or_404(row: asyncpg.Record | None) -> asyncpg.Record:
    # The principal dependency refuses deleted accounts; this covers one deleted meanwhile.
    if row is None:
        raise NotFound("account")
    return row


def _binding(row: asyncpg.Record) -> Binding:
    data = dict(row)
    pay_later = data.pop("pay_later", False)
    state = data.get("service_state")
    note = SERVICE_NOTES[state] if state else SERVICE_UNKNOWN_NOTE if pay_later else None
    return Binding(**data, service_note=note)


async def _look_up(
    runtime: Runtime, agreement: asyncpg.Record | None, vehicles: list[tuple[str, str]]
) -> list[PlateService]:
    """The provider's state of each vehicle under the account's agreement (none without one,
    or with one of another provider). Asked in the request, where the driver expects it fresh;
    an outage leaves it to the worker's sweep."""
    if agreement is None or agreement["provider"] != runtime.provider.name:
        return []
    return await agreements.look_up_states(
        runtime.provider, [(agreement["agreement_no"], plate, color) for plate, color in vehicles]
    )


async def _bound(
    conn: asyncpg.Connection,
    runtime: Runtime,
    account_id: int,
    binding_id: int,
    answered: list[PlateService],
) -> Binding:
    """The new binding with the plate's service state just looked up."""
    await agreements.record_looked_up(conn, runtime.provider.name, answered, datetime.now(UTC))
    for row in await repo.active_bindings(conn, account_id):
        if row["id"] == binding_id:
            return _binding(row)
    raise NotFound("binding")


def _agreement(row: asyncpg.Record | None) -> Agreement | None:
    return Agreement(**dict(row)) if row else None


async def me(conn: asyncpg.Connection, account_id: int) -> Me:
    row = _account_or_404(await repo.account(conn, account_id))
    return Me(
        account_id=row["id"],
        phone=row["phone"],
        display_name=row["display_name"],
        blocked_for_arrears=row["blocked_for_arrears"],
        plates=[_binding(b) for b in await repo.active_bindings(conn, account_id)],
        agreement=_agreement(await repo.active_agreement(conn, account_id)),
        open_debt_fen=await repo.open_debt_total(conn, account_id),
        plate_claims=[
            PlateClaimState(**dict(r)) for r in await repo.plate_claims(conn, account_id)
        ],
    )


async def plates(conn: asyncpg.Connection, account_id: int) -> list[Binding]:
    return [_binding(b) for b in await repo.active_bindings(conn, account_id)]


def canonical_plate(raw: str, color: str) -> str:
    plate = grammar.normalise(raw)
    if plate is None or not grammar.is_valid(plate, color):
        raise AppError(
            422,
            "invalid_plate",
            "车牌号格式不符 / not a valid plate for this colour (e.g. 浙A12345; green "
            "new-energy plates have 8 characters, and no plate has I or O)",
            {"plate": raw, "color": color},
        )
    return plate


async def claim_plate(
    conn: asyncpg.Connection,
    runtime: Runtime,
    registry: VehicleRegistry,
    account_id: int,
    claim: PlateClaim,
) -> Binding | PlateDisputed:
    """Binds a vehicle (plate, colour) the driver proves to own. One bound to another account
    opens a dispute (returned, and committed, so an operator can decide it), unless the
    registry's own record proves the driver the owner: then the dispute ends at once and the
    binding moves to the driver (parking.ownership)."""
    plate = canonical_plate(claim.plate, claim.color)
    await hit(
        runtime.redis,
        f"{runtime.settings.redis_key_prefix}ratelimit:plate-claims:account:{account_id}",
        PLATE_CLAIMS_PER_HOUR,
        3600,
    )
    proof = await registry.prove(plate, claim.color, claim.licence_no, claim.owner_name)
    if proof == "not_proven":
        raise AppError(
            422,
            "ownership_not_proven",
            "the vehicle registry does not confirm this licence and owner for the plate",
        )
    proof_ref = await licence_ref(claim.licence_no)
    answered = await _look_up(
        runtime, await repo.active_agreement(conn, account_id), [(plate, claim.color)]
    )
    _account_or_404(await repo.account(conn, account_id, lock=True))
    holder = await repo.active_binding(conn, plate, claim.color)
    if holder is not None and holder["account_id"] == account_id:
        raise AppError(409, "already_bound", "this plate is already bound to your account")
    if len(await repo.active_bindings(conn, account_id)) >= MAX_PLATES_PER_ACCOUNT:
        raise AppError(
            409, "too_many_plates", f"at most {MAX_PLATES_PER_ACCOUNT} plates per account"
        )
    if holder is None:
        row = await repo.insert_binding(
            conn,
            account_id,
            plate,
            claim.color,
            verified_by=registry.name,
            licence_ref=proof_ref,
        )
        if row is not None:
            # Claims of the vehicle follow its holder: against this account now (its own claim,
            # if any, is moot), never against the one that gave the plate up.
            await ownership.claims_follow_binding(conn, plate, claim.color, account_id, row["id"])
            log.info("drivers.plate_bound", account_id=account_id, plate=pseudonym(plate))
            return await _bound(conn, runtime, account_id, row["id"], answered)
        # Bound by a concurrent claim that committed first.
        holder = await repo.active_binding(conn, plate, claim.color)
        assert holder is not None
        if holder["account_id"] == account_id:
            raise AppError(409, "already_bound", "this plate is already bound to your account")
    dispute_id = await repo.open_dispute(
        conn,
        plate=plate,
        color=claim.color,
        claimant_account_id=account_id,
        holder_account_id=holder["account_id"],
        holder_binding_id=holder["id"],
        verified_by=registry.name,
        licence_ref=proof_ref,
        same_licence_as_holder=await same_licence(claim.licence_no, holder["licence_ref"]),
    )
    log.info(
        "drivers.plate_disputed",
        account_id=account_id,
        dispute_id=dispute_id,
        plate=pseudonym(plate),
    )
    if proof != "registered_owner":
        return PlateDisputed(dispute_id)
    binding_id = await ownership.uphold(
        conn, dispute_id, resolved_by=f"registry:{registry.name}", note=None
    )
    return await _bound(conn, runtime, account_id, binding_id, answered)


async def unbind_plate(conn: asyncpg.Connection, account_id: int, binding_id: int) -> None:
    if await repo.open_debt_total(conn, account_id):
        # Otherwise unbinding would turn the next exit into an unbound one, fee without debts.
        raise AppError(409, "settle_debts_first", "pay what is owed before unbinding a plate")
    if await repo.has_pending_charges(conn, account_id, binding_id=binding_id):
        # A charge in flight may yet fail: its debt must find the account the plate is bound to.
        raise AppError(409, "charges_pending", _CHARGES_PENDING)
    if not await repo.unbind(conn, account_id, binding_id):
        raise NotFound("binding")


async def agreement(conn: asyncpg.Connection, account_id: int) -> Agreement:
    found = _agreement(await repo.active_agreement(conn, account_id))
    if found is None:
        raise NotFound("agreement")
    return found


async def sign_agreement(
    conn: asyncpg.Connection, runtime: Runtime, account_id: int, request: AgreementRequest
) -> Agreement:
    """Turns pay-later on. On WeChat the agreement's number is the driver's openid (the
    provider knows the driver by it), as WeChat names it for the driver's sign-in code; the
    bound plates' service states are looked up now."""
    provider = runtime.provider
    openid = (
        await _wechat_openid(provider, request.wechat_code)
        if isinstance(provider, WeChatParkingProvider)
        else None
    )
    agreement_no = openid or f"AGR-{uuid.uuid4().hex}"
    if await repo.active_agreement(conn, account_id) is not None:
        if openid is not None and await agreements.verify_own(conn, account_id, openid):
            # The driver proved the openid of their own agreement (one made while the app
            # named it): it stays as it is, paying for the stays it covers.
            await audit.record(
                conn, f"account:{account_id}", "agreement.verified", f"account:{account_id}", {}
            )
            return await agreement(conn, account_id)
        raise AppError(409, "agreement_exists", "cancel the active agreement first")
    if openid is not None:
        await _displace_unverified(conn, account_id, openid)
    bound = await repo.active_bindings(conn, account_id)
    answered = await agreements.look_up_states(
        provider, [(agreement_no, b["plate"], b["color"]) for b in bound]
    )
    try:
        await agreements.sign(
            conn,
            account_id,
            provider=provider.name,
            agreement_no=agreement_no,
            per_session_limit_fen=request.per_session_limit_fen,
        )
    except agreements.AgreementNoInUse as exc:
        raise AppError(
            409,
            "openid_in_use",
            "该微信身份已在另一个账户开通先离场后付费 / this WeChat identity has pay-later on "
            "another account",
        ) from exc
    except agreements.AgreementError as exc:
        # The limit was validated, so only a concurrent signing can get here.
        raise AppError(409, "agreement_exists", "cancel the active agreement first") from exc
    await agreements.record_looked_up(conn, provider.name, answered, datetime.now(UTC))
    return await agreement(conn, account_id)


async def _displace_unverified(conn: asyncpg.Connection, account_id: int, openid: str) -> None:
    """The openid's owner, proven by WeChat, takes it over from an agreement whose holder only
    named it (before the server asked WeChat); that account is told and its pay-later ends."""
    displaced = await agreements.displace_unverified(conn, "wechat", openid, account_id)
    if displaced is None:
        return
    await audit.record(
        conn,
        f"account:{account_id}",
        "agreement.displaced",
        f"account:{displaced}",
        {"reason": "the openid's owner signed in with WeChat"},
    )
    await messages.enqueue(
        conn,
        account_id=displaced,
        kind="agreement_displaced",
        source_key=f"agreement-displaced:{displaced}:{account_id}",
        body="您账户的先离场后付费所用的微信身份已由其本人开通，本账户的先离场后付费已关闭；"
        "如需继续使用，请用您自己的微信重新开通。",
    )
    log.warning("drivers.agreement_displaced", account_id=displaced)


async def _wechat_openid(provider: WeChatParkingProvider, code: str | None) -> str:
    if code is None:
        raise AppError(
            422,
            "wechat_code_required",
            "请先用微信登录以开通微信支付分停车服务 / WeChat pay-later needs the driver's "
            "WeChat sign-in code (wx.login)",
        )
    unavailable = AppError(
        503, "wechat_unavailable", "微信暂时无法确认您的身份，请稍后再试 / try again later"
    )
    try:
        return await provider.openid_of(code)
    except ProviderRejected as exc:
        if exc.side != "driver":
            # The car park's app itself refused (its AppSecret reset or mistyped): every
            # driver would meet it, and signing in again cannot help.
            log.error("drivers.wechat_sign_in_refused", code=exc.code)
            raise unavailable from exc
        raise AppError(
            422,
            "wechat_code_invalid",
            "微信登录已失效，请重新登录 / WeChat refused the sign-in code: sign in again",
        ) from exc
    except ProviderUnavailable as exc:
        raise unavailable from exc


async def set_agreement_limit(
    conn: asyncpg.Connection, account_id: int, per_session_limit_fen: int
) -> Agreement:
    try:
        await agreements.set_limit(conn, account_id, per_session_limit_fen)
    except agreements.AgreementError as exc:
        raise NotFound("agreement") from exc
    return await agreement(conn, account_id)


async def cancel_agreement(conn: asyncpg.Connection, account_id: int) -> None:
    if not await agreements.cancel(conn, account_id):
        raise NotFound("agreement")


async def stays(
    conn: asyncpg.Connection,
    account_id: int,
    *,
    status: str | None,
    before: datetime | None,
    limit: int,
) -> StayPage:
    rows = await repo.stays(conn, account_id, status=status, before=before, limit=limit)
    items = [Stay(**dict(r)) for r in rows]
    return StayPage(items=items, next_before=items[-1].entered_at if len(items) == limit else None)


async def receipt(conn: asyncpg.Connection, account_id: int, stay_id: int) -> Receipt:
    row = await repo.stay(conn, account_id, stay_id)
    if row is None:
        raise NotFound("stay")
    until = row["exited_at"] or datetime.now(UTC)
    captures = [c for c in (row["entry_capture_id"], row["exit_capture_id"]) if c is not None]
    framed = {
        c["capture_id"]: bool(c["has_frame"]) for c in await disputes_repo.captures(conn, captures)
    }
    dispute = await disputes_repo.dispute_of_stay(conn, stay_id)
    charge = None
    if row["charge_status"] is not None:
        charge = ChargeView(
            amount_fen=row["charge_amount_fen"],
            status=row["charge_status"],
            created_at=row["charge_created_at"],
            settled_at=row["charge_settled_at"],
        )
    return Receipt(
        id=row["id"],
        car_park=row["car_park"],
        plate=row["plate"],
        status=row["status"],
        entered_at=row["entered_at"],
        exited_at=row["exited_at"],
        duration_minutes=max(0, int((until - row["entered_at"]).total_seconds()) // 60),
        fee_fen=row["fee_fen"],
        settlement=row["settlement"],
        charge=charge,
        refunds=[RefundView(**dict(r)) for r in await repo.refunds_of_stay(conn, stay_id)],
        entry_frame=framed.get(row["entry_capture_id"], False),
        exit_frame=framed.get(row["exit_capture_id"], False),
        dispute=disputes_service.view(dispute) if dispute is not None else None,
        disputable=dispute is None and await disputes_repo.disputable(conn, account_id, stay_id),
        pass_name=row["pass_name"],
    )


async def stay_frame(conn: asyncpg.Connection, account_id: int, stay_id: int, which: str) -> bytes:
    """The entry or exit frame of one of the driver's own stays; 404 when none is kept."""
    row = await repo.stay(conn, account_id, stay_id)
    if row is None:
        raise NotFound("stay")
    capture_id = row["entry_capture_id"] if which == "entry" else row["exit_capture_id"]
    return await disputes_service.frame_for_driver(conn, stay_id, capture_id)


async def debts(conn: asyncpg.Connection, account_id: int) -> Debts:
    items = [DebtView(**dict(r)) for r in await repo.open_debts(conn, account_id)]
    return Debts(total_fen=sum(d.amount_fen for d in items), debts=items)


async def pay_debts(runtime: Runtime, account_id: int) -> DebtPayment:
    """One payment for everything owed (the same one while it is unpaid); 409 `no_debts`."""
    payment = await payments_service.start_debt_payment(runtime, account_id)
    return DebtPayment(
        out_trade_no=payment.out_trade_no,
        amount_fen=payment.amount_fen,
        pay_url=payment.pay_url,
        status=payment.status,
    )


async def notifications(
    conn: asyncpg.Connection, account_id: int, limit: int
) -> list[NotificationView]:
    return [NotificationView(**dict(r)) for r in await repo.notifications(conn, account_id, limit)]


async def export(conn: asyncpg.Connection, account_id: int) -> Export:
    _account_or_404(await repo.account(conn, account_id))
    return Export(
        exported_at=datetime.now(UTC),
        account=await repo.export_account(conn, account_id),
        bindings=await repo.export_bindings(conn, account_id),
        agreements=await repo.export_agreements(conn, account_id),
        stays=await repo.export_stays(conn, account_id),
        charges=await repo.export_charges(conn, account_id),
        payments=await repo.export_payments(conn, account_id),
        debts=await repo.export_debts(conn, account_id),
        refunds=await repo.export_refunds(conn, account_id),
        notifications=await repo.export_notifications(conn, account_id),
        disputes=await repo.export_disputes(conn, account_id),
    )


async def _withdraw_disputes(conn: asyncpg.Connection, account_id: int) -> None:
    """What the account disputed, and the claims of vehicles it held, end with it, each
    audit-logged: no operator decides for an account that is gone. A claimant whose claim
    was of this account's vehicle is told the vehicle is free to bind."""
    actor = f"account:{account_id}"
    reason = {"reason": "account_deleted"}
    # Deleting waited for disputed charges and debts to settle: nothing these held is held.
    for dispute_id in await disputes_repo.withdraw_of_account(conn, account_id):
        await audit.record(
            conn, actor, "charge_dispute.withdrawn", f"charge_dispute:{dispute_id}", reason
        )
    for claim in await repo.withdraw_plate_disputes(conn, account_id):
        await audit.record(
            conn, actor, "plate_dispute.withdrawn", f"plate_dispute:{claim['id']}", reason
        )
        if claim["claimant_account_id"] != account_id:
            vehicle = ownership.vehicle_text(claim["plate"], claim["color"])
            await messages.enqueue(
                conn,
                account_id=claim["claimant_account_id"],
                kind="plate_ownership_released",
                source_key=f"plate-dispute:{claim['id']}:claimant",
                body=f"{vehicle}已不再绑定在其他账户，您的归属申请已结束；"
                "如需绑定，请在App中重新添加该车牌。",
            )


async def delete_account(conn: asyncpg.Connection, account_id: int) -> None:
    """Erases the account's personal data in the request's one transaction. Money records
    (stays, charges, payments, debts, refunds, the ledger) are kept, as the law requires, but
    no longer lead to a phone. Signing in with the same phone later starts a new account."""
    row = _account_or_404(await repo.account(conn, account_id, lock=True))
    if await repo.open_debt_total(conn, account_id) > 0:
        raise AppError(409, "settle_debts_first", "pay what you owe before deleting the account")
    if await repo.has_pending_charges(conn, account_id):
        # A charge still in flight may yet fail and become a debt nobody could pay.
        raise AppError(409, "charges_pending", _CHARGES_PENDING)
    await repo.erase_account(conn, account_id)
    await repo.unbind_all(conn, account_id)
    await agreements.cancel(conn, account_id)
    await auth_repo.revoke_subject(conn, f"account:{account_id}")
    await _withdraw_disputes(conn, account_id)
    await repo.erase_notifications(conn, account_id)
    await repo.delete_sign_in_codes(conn, row["phone"])
    await audit.record(
        conn,
        actor=f"account:{account_id}",
        action="account.deleted",
        subject=f"account:{account_id}",
        detail={},
    )
    log.info("drivers.account_deleted", account_id=account_id)
