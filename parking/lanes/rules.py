"""The exit decision's pure rules: which stay an exit read belongs to, what the stay costs and
how it may leave.

Pure functions, no I/O. The lane (`service.py`) calls `resolve_plate` with the cars parked
and just gone that it read, and `exit_rule` inside its transaction with the stay and the
driver's pay-later state it read with it; the city-day loader (`parking_dev.citybench`) decides
the stays it generates with the same `exit_rule`, and its test re-decides every loaded stay with
it; a misread simulation can run `resolve_plate` a million times without a database. A change
to which stay a read is, when a stay is free, pay-later or held, or to what it is charged,
belongs here, so that none of them can drift from the others.

A plate's identity is (characters, colour): 蓝 浙A12345 and 黄 浙A12345 are two vehicles. A
read is *certain* when its score reaches its source's threshold, it has a colour and it is a
valid plate of that colour (for the server's reader, a colour its frames showed surely); only a
certain read matches a parked plate exactly. It is *proven*
when that threshold is a calibrated one (server OCR, an operator, a camera model an installer
measured): a stay whose entry and exit reads were both proven is charged pay-later on them
alone; any other charge the lane opens the gate for waits until the server's reader agrees
with the stay's frames (`verify_charge`, run by the worker after the car left), or for a
person (DESIGN.md, "The exit decision" 3-5).
"""

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol, TypeVar

from billing import fees
from billing.rights import Applied, RightTerms, Validation
from parking.lanes.repository import CameraOwnRead, OpenSession, PayLater
from parking.settings import Settings
from plate_recognition.grammar import COLORS, Candidate, is_valid, normalise, settled_color
from plate_recognition.matching import match, plausible_plate

# (plate, colour): what a stay, a binding and a read are about.
Identity = tuple[str, str]
ReadSource = Literal["camera", "ocr", "none", "operator"]
# What the car park does with an exit whose charge cannot rest on two certain reads.
UncertainPolicy = Literal["hold", "open_confirm"]

Outcome = Literal[
    "entered",
    "entered_superseding",
    "duplicate_read",
    "exited_free",
    "exited_pay_later",
    "held_unbound",
    "held_no_agreement",
    "held_over_limit",
    "held_arrears",
    "held_no_entry",
    "held_unreadable",
    "held_ambiguous",
    "held_no_tariff",
    "exited_offline_unpaid",
    # An offline capture the gate sent to the booth: the stay awaits a booth payment.
    "exited_offline_booth",
    # An offline capture of a stay the booth was already paid for.
    "exited_paid_at_booth",
    # A pay-later charge whose reads were not both certain: the gate opened and the charge
    # waits for an operator (car park policy 'open_confirm'), or the gate holds ('hold').
    "exited_awaiting_confirmation",
    "held_uncertain",
    # A stay opened at the exit under the no-entry fixed fee: paid at the gate, never
    # charged to a pay-later account on one read (DESIGN.md step 9).
    "held_no_entry_fee",
    # A vehicle on the company's blacklist, at the entry or the exit: a person decides.
    "held_blacklisted",
]
ResolutionStatus = Literal["exact", "fuzzy", "ambiguous", "no_entry", "unreadable"]
# Why an exit (or entry) waits for an operator in `lane_exceptions`.
ExceptionReason = Literal[
    "unreadable", "ambiguous", "no_entry", "offline_exit", "uncertain", "blacklisted"
]


def identity_color(plate: str, color: str | None) -> str:
    """The colour a stay of `plate` is kept under: the read's when it is a colour the plate's
    grammar allows, else the most common of its form's (8 characters: green new energy;
    otherwise blue), as migration 0017 gave the stays recorded without a colour. Only a colour
    the characters settle (`settled_color`) vouches for the vehicle; this one only files it."""
    if color is not None and color in COLORS and is_valid(plate, color):
        return color
    return "green" if len(plate) == 8 else "blue"


@dataclass(frozen=True, slots=True)
class Certainty:
    """The score from which a read of each source is certain: server OCR's calibrated
    probability, and each camera model's (`camera_read.model`), else the cameras' default.

    Which certain reads are *proven* (DESIGN.md step 5: a calibrated score): server OCR's (its
    table is measured), an operator's, and a camera model's listed in `camera_scores` (an
    installer set it from a calibration of that model's reads, each judged right only when its
    characters and its colour both were: a camera's read names the vehicle, colour included,
    and nothing checks a proven end's colour again), or any camera's when
    `camera_default_calibrated` says the default was set so. A certain read of an uncalibrated
    camera is only one reader's word: a charge on it waits for the server's reader to agree
    with the capture's frames (`verify_charge`)."""

    ocr_score: float
    camera_scores: Mapping[str, float] = field(default_factory=dict)
    camera_default: float = 0.98
    camera_default_calibrated: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "Certainty":
        return cls(
            settings.plate_certain_score,
            dict(settings.camera_certain_scores),
            settings.camera_certain_score_default,
            settings.camera_default_calibrated,
        )

    def calibrated(self, source: ReadSource, model: str | None) -> bool:
        if source in ("ocr", "operator"):
            return True
        if source == "camera":
            return (model is not None and model in self.camera_scores) or (
                self.camera_default_calibrated
            )
        return False

    def threshold(self, source: ReadSource, model: str | None) -> float | None:
        if source == "camera":
            return (
                self.camera_scores.get(model, self.camera_default)
                if model
                else (self.camera_default)
            )
        if source == "ocr":
            return self.ocr_score
        return None


class Read(Protocol):
    """What a reader made of a capture (lanes.reading.PlateReading is one; `ExitRead` is a
    plain one for simulations)."""

    @property
    def candidates(self) -> tuple[Candidate, ...]: ...
    @property
    def color(self) -> str | None: ...
    @property
    def source(self) -> ReadSource: ...
    @property
    def model(self) -> str | None: ...
    @property
    def raw(self) -> str | None: ...
    @property
    def color_sure(self) -> bool: ...


R = TypeVar("R", bound=Read)


@dataclass(frozen=True, slots=True)
class ExitRead:
    candidates: tuple[Candidate, ...]
    color: str | None
    source: ReadSource
    model: str | None = None
    raw: str | None = None
    # A server read's colour shown surely by a frame (`PlateReading.color_sure`).
    color_sure: bool = False


def is_certain(read: Read, certainty: Certainty) -> bool:
    """A read the lane may take as the car's identity without matching: an operator's plate, or
    a reader's top candidate at or above its source's threshold, with a colour, grammatical
    as read for that colour (a '7-character green' plate is a misread of something). The
    server's reader is certain of a vehicle only with the colour a frame showed surely
    (`PlateReading.color_sure`), unless the characters settle it (`grammar.settled_color`): its
    score calibrates the characters, and a blue and a yellow 浙A12345 are two vehicles, so a
    guessed colour, or the doubtful camera's, leaves the read to be matched and verified."""
    best = read.candidates[0] if read.candidates else None
    if best is None or read.color not in COLORS or best.corrected:
        return False
    if not is_valid(best.plate, read.color):
        return False
    if read.source == "ocr" and not read.color_sure and settled_color(best.plate) is None:
        return False
    if read.source == "operator":
        return True
    threshold = certainty.threshold(read.source, read.model)
    return threshold is not None and best.score >= threshold


def is_proven(read: Read, certainty: Certainty) -> bool:
    """A certain read whose score is a calibrated probability (`Certainty.calibrated`): a
    charge may rest on it without a second reader."""
    return is_certain(read, certainty) and certainty.calibrated(read.source, read.model)


def wants_second_reader(read: Read, outcome: Outcome, certainty: Certainty) -> bool:
    """Whether the server's reader reads a capture's frames before an operator is asked: a
    camera read that is not proven (an uncalibrated camera's, or a doubtful one) found no
    stay, or no unique one, or is too doubtful for a 'hold' car park to open on. The frames
    may show a parked car the camera misread (a character, the colour); a car that really has
    no entry record is read as itself again. For 'held_uncertain' only a certain (so proven)
    server read changes the decision (a doubtful one is the server's word alone:
    `frames_to_verify`), or one that finds no stay; rare, but the misread simulation sees
    both. Only these rare exits pay for OCR on the gate's path."""
    return (
        read.source == "camera"
        and outcome in ("held_no_entry", "held_ambiguous", "held_uncertain")
        and not is_proven(read, certainty)
    )


def entry_wants_second_reader(read: Read, certainty: Certainty) -> bool:
    """Whether an entry's frames are read by the server before its stay is opened: a doubtful
    camera read (not certain). A stay opened under a misread plate is found by nobody at the
    exit (the car is "no entry record" and the stay a ghost); entries are not the exit's
    hot path."""
    return read.source == "camera" and not is_certain(read, certainty)


def better_entry_read(camera: R, server: R, verification: "Verification") -> R:
    """The read a stay is opened under when the camera was doubtful: the server's when it is
    sure enough to agree with at a charge's verification (a calibrated score of
    `agree_score`: reads scored 0.9 and more were the plate 97 % of the time under gate
    conditions), else the camera's."""
    best = server.candidates[0] if server.candidates else None
    return server if best is not None and best.score >= verification.agree_score else camera


def of_plate(read: str | None, plate: str) -> bool:
    """Whether a frame's read is of `plate` (a misread of one character at most, a look-alike
    province included), not of another car in the frame: what a frame's colour may speak for."""
    return (
        read is not None
        and len(read) == len(plate)
        and sum(a != b for a, b in zip(read, plate, strict=True)) <= 1
    )


@dataclass(frozen=True, slots=True)
class FrameRead:
    """The server reader's top read of one frame (`plate` None: no plate found), its score a
    calibrated probability, the plate's colour as the frame shows it (None: not seen) and
    whether that colour is sure (`plate_recognition.localise.plate_color`). `small`: the plate
    was under `plate_recognition.calibration.SMALL_PLATE_PX` high in the frame, where S and 5 or
    B and 8 are a pixel apart: its read never vouches for a vehicle nor outweighs a sure read of
    a larger frame; it may still refute a charge at an end no sure read settled."""

    plate: str | None
    score: float
    color: str | None = None
    color_sure: bool = False
    small: bool = False


@dataclass(frozen=True, slots=True)
class Verification:
    """When the server's reader settles a charge on an unproven read (`verify_charge`): a frame
    *agrees* when its top read is the stay's plate at `agree_score` or more, and *contradicts*
    when it is another valid plate at `contradict_score` or more (reads scored 0.9 and more
    were a different valid plate 1.4 % of the time under gate conditions, none clean:
    `plate_recognition/calibration.json`).

    `certain_score`: the server reader's certain threshold (`Certainty.ocr_score`, where a wrong
    valid plate is at most 1 in 10,000 under gate conditions too). A frame read at it is a
    proven read on its own: the end it belongs to is settled as an end whose read was proven
    (`verify_charge`). 1.0 and more: never."""

    agree_score: float = 0.9
    contradict_score: float = 0.9
    certain_score: float = 1.01

    @classmethod
    def from_settings(cls, settings: Settings) -> "Verification":
        return cls(
            settings.verify_agree_score,
            settings.verify_contradict_score,
            settings.plate_certain_score,
        )


VerifyVerdict = Literal["verified", "refuted", "unconfirmed"]
# Why a charge waits for a person: a frame read another vehicle with confidence (refuted); a
# frame surely showed the plate's colour otherwise; an unproven end had no reader besides the
# server's; no frame of an unproven end read the vehicle with confidence, or only frames whose
# plate was too small to vouch for it; no frame of an unproven end surely showed the colour.
VerifyReason = Literal[
    "another_vehicle",
    "colour_differs",
    "no_second_reader",
    "no_agreeing_frame",
    "plate_too_small",
    "colour_unconfirmed",
]
END_NAMES = ("entry", "exit")


@dataclass(frozen=True, slots=True)
class Verdict:
    """`verify_charge`'s answer, and for a person why and at which end (`END_NAMES`)."""

    outcome: VerifyVerdict
    reason: VerifyReason | None = None
    end: str | None = None


def camera_names(camera: CameraOwnRead, identity: Identity) -> bool:
    """Whether the camera's own read is exactly this vehicle: its plate's characters, and its
    colour when the camera reported one."""
    return normalise(camera.text) == identity[0] and camera.color in (None, identity[1])


def has_second_reader(identity: Identity, source: str | None, camera: CameraOwnRead | None) -> bool:
    """Whether an unproven end of a stay of `identity` had a reader besides the server's whose
    read the server's frames can corroborate: the camera that decided the end, or, for an end
    the server's reader decided, the camera's own read when it named exactly this vehicle.

    A camera that named another plate (or colour) leaves the end unconfirmed, it does not
    refute it: its score is not calibrated, so there is no score at which its read says
    "another vehicle" with a known error (a refutation is a calibrated frame read,
    `Verification.contradict_score`), and the two readers disagreeing already sends the charge
    to a person. Reading the same frames again with the server's reader is never a second
    reader."""
    if source == "camera":
        return True
    return source == "ocr" and camera is not None and camera_names(camera, identity)


def frames_to_verify(
    identity: Identity,
    proven: bool,
    source: str | None,
    frames: Sequence[FrameRead],
    camera: CameraOwnRead | None = None,
) -> Sequence[FrameRead] | None:
    """What `verify_charge` may weigh for one end of a stay of `identity`: nothing to check when
    its read was proven (None); the server reader's reads of its frames when the end had a
    second reader (`has_second_reader`: the camera decided it, or the server's reader decided
    it and the camera's own read, `camera`, named this vehicle); and no corroboration at all
    (an empty list: `unconfirmed`) when the server's reader alone named the vehicle, since
    reading the same frames again with the same reader is not a second opinion.

    The mirror of a camera-decided end: there the camera named the car and the server's frames
    must agree; here the server named it and the camera's own text must be the plate, with the
    server's frames agreeing at `Verification.agree_score` (its decided read may carry the
    camera's text as a candidate, the frames' reads never do)."""
    if proven:
        return None
    return frames if has_second_reader(identity, source, camera) else ()


def verify_charge(
    identity: Identity,
    ends: Sequence[Sequence[FrameRead] | None],
    verification: Verification,
) -> Verdict:
    """Whether a pay-later charge for a stay of `identity` may go to the provider without a
    person.

    `ends`: for the entry and the exit, the server reader's reads of that capture's frames,
    or None for an end whose read was proven (it needs no second reader). A charge is
    `verified` when no frame of either end contradicts the vehicle (another valid plate, or
    the plate in another colour) and every unproven end has a frame that agrees (the plate, in
    the stay's colour when the frame shows one): two readers, the camera and the server's, then
    name the same vehicle at both ends. `refuted`: some frame shows another vehicle;
    `unconfirmed`: an unproven end had no frame, or none the server read as the plate with
    confidence, or a frame surely shows another colour (below). Both wait for an operator.

    An end with a frame the server read as the vehicle at its certain threshold
    (`Verification.certain_score`) and none it read as another vehicle at that threshold is
    settled like an end whose read was proven (the lane opens a stay on such a server read
    alone, `better_entry_read`, and never checks a proven end's frames): a doubtful read of
    another plate in a second frame (a car behind, a wrong valid read at 0.9-0.95, which the
    calibration saw on clean photos too) does not outweigh it. Agreement below the certain
    threshold is never summed across frames: a plate that reads wrong the same way does so on
    every frame of a pass, which per-frame calibration does not measure.

    A plate's colour is read from its pixels, not calibrated like its text: a frame of either end
    that surely shows a plate in another colour than the stay's, whatever its text's score,
    leaves the charge `unconfirmed`, even at an end settled by sure reads (a yellow plate taken
    for blue at both gates, its frames mostly blue, was charged to the blue plate's holder when
    only surely read text counted). A colour that is only the likelier guess takes no part.

    The colour needs its second reader as the characters do: a blue and a yellow 浙A12345
    are two vehicles, and a camera that takes the one for the other at both gates (a cast of
    light, dirt on a yellow plate) names the other's holder with a sure score. So every
    unproven end, settled by sure reads or not, needs a frame of the plate (its characters
    read with at most one wrong) that surely shows the stay's colour (`colour_unconfirmed`
    otherwise), unless its characters settle it (`grammar.settled_color`: a small new-energy
    plate's eight; a large one's are a green's or a yellow's). A sure colour is the
    server reader's hue and character polarity agreeing
    (`plate_recognition.localise.plate_color`); a frame taken in night mode (infrared,
    monochrome), or in a light that hides the colour, shows none.

    A frame whose plate was small (`FrameRead.small`) neither agrees, nor settles an end, nor
    keeps a sure read of a larger frame from settling it: the camera and the server's reader,
    shown the same few pixels, misread a confusable character the same way, so its agreement
    is no second opinion and its contradiction no more than a doubtful read's.

    One reader's certainty is not two independent reads: a plate that fools a camera the
    same way at entry and exit (a bolt, dirt, a worn character) does so with a confident
    score both times, so "entry and exit both certain" does not multiply the error away."""
    plate, color = identity

    def same(read: FrameRead) -> bool:
        return read.plate == plate and read.color in (None, color)

    def certain(read: FrameRead) -> bool:
        return (
            read.plate is not None
            and read.score >= verification.certain_score
            and not read.small
            and (same(read) or is_valid(read.plate))
        )

    def vouches(read: FrameRead) -> bool:
        return same(read) and read.score >= verification.agree_score

    def shows_colour(read: FrameRead) -> bool:
        return of_plate(read.plate, plate) and read.color_sure and read.color == color

    named = list(zip(END_NAMES, ends, strict=True))
    checked = [
        (end, frames)
        for end, frames in named
        if frames is not None
        and not (
            any(certain(read) and same(read) for read in frames)
            and not any(certain(read) and not same(read) for read in frames)
        )
    ]
    for end, frames in checked:
        for read in frames:
            if (
                read.plate is not None
                and read.score >= verification.contradict_score
                and (read.plate != plate or (read.color is not None and read.color != color))
                and is_valid(read.plate)
            ):
                return Verdict("refuted", "another_vehicle", end)
    for end, reads in named:
        if any(
            read.plate is not None and read.color_sure and read.color != color
            for read in reads or ()
        ):
            # The colour is half the vehicle's identity and the frames disagree on it: however
            # sure the text, the charge cannot rest on the colour the others showed.
            return Verdict("unconfirmed", "colour_differs", end)
    for end, frames in checked:
        if not frames:
            return Verdict("unconfirmed", "no_second_reader", end)
        if not any(vouches(read) and not read.small for read in frames):
            too_small = any(vouches(read) for read in frames)
            return Verdict(
                "unconfirmed", "plate_too_small" if too_small else "no_agreeing_frame", end
            )
    if settled_color(plate) is None:
        for end, shown in named:
            if shown is not None and not any(shows_colour(read) for read in shown):
                return Verdict("unconfirmed", "colour_unconfirmed", end)
    return Verdict("verified")


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which stay an exit read belongs to, or why none.

    `identity`: the matched stay's (exact, fuzzy), or for `no_entry` the read's own when it is
    a plate (a fixed-fee stay may be opened for it). `certain`: the exit read was certain.
    `left`: the identity is of a car that left within the duplicate window (this read is a
    second read of it). `entry_certain`: the matched parked stay's entry read was certain.
    Statuses: `exact` only for a certain read equal to the stay's identity; `fuzzy` for any
    other match (an uncertain read, found unique and with a margin among the cars here, even
    when its text equals the plate); `ambiguous`, `no_entry`, `unreadable` for a person or the
    car park's no-entry policy."""

    status: ResolutionStatus
    identity: Identity | None = None
    certain: bool = False
    left: bool = False
    entry_certain: bool = False
    ranked: tuple[tuple[str, float], ...] = ()
    # The exit read was proven (`is_proven`: certain, and its score calibrated).
    proven: bool = False

    @property
    def reads_certain(self) -> bool:
        """Whether a charge for the matched stay may rest on its reads alone: entry and exit
        both certain (the colour agreeing with the binding is the lane's binding lookup,
        which joins on it)."""
        return self.status == "exact" and self.certain and self.entry_certain


def resolve_plate(
    read: Read,
    parked: Mapping[Identity, bool],
    left: Collection[Identity],
    certainty: Certainty,
) -> Resolution:
    """The stay an exit read belongs to. `parked`: the identities with an open stay here, each
    with whether its entry read was certain; `left`: identities whose stay here closed within
    the duplicate window. For a certain read only its own identity matters, so a caller may
    pass just that entry of either.

    A certain read matches its identity exactly or is a car with no entry record: never a
    look-alike, another colour or another province. Any other read is matched confusion-aware
    against the cars here of its colour (any colour when it has none), and only a unique one
    with a margin, which `plate_recognition.matching.match` refuses for a read that is a valid
    plate of its own that is not parked (no entry record explains it as well)."""
    best = read.candidates[0] if read.candidates else None
    if best is None:
        return Resolution("unreadable")
    if is_certain(read, certainty):
        assert read.color is not None
        identity = (best.plate, read.color)
        proven = certainty.calibrated(read.source, read.model)
        if identity in parked:
            return Resolution(
                "exact", identity, True, entry_certain=parked[identity], proven=proven
            )
        if identity in left:
            return Resolution("exact", identity, True, left=True, proven=proven)
        return Resolution("no_entry", identity, True, proven=proven)
    color = identity_color(best.plate, read.color) if read.color else None
    by_text: dict[str, list[Identity]] = {}
    for identity in (*parked, *(i for i in left if i not in parked)):
        if color is None or identity[1] == color:
            by_text.setdefault(identity[0], []).append(identity)
    result = match(read.candidates, by_text, raw=read.raw)
    if result.status == "ambiguous":
        return Resolution("ambiguous", ranked=result.ranked)
    if result.plate is None:
        own = (
            (best.plate, identity_color(best.plate, read.color)) if plausible_plate(best) else None
        )
        return Resolution("no_entry", own, ranked=result.ranked)
    identities = by_text[result.plate]
    if len(identities) > 1:
        # The same characters on two vehicles here (a blue car and a yellow lorry), and a read
        # whose colour does not tell them apart.
        return Resolution("ambiguous", ranked=result.ranked)
    identity = identities[0]
    if identity in parked:
        return Resolution("fuzzy", identity, entry_certain=parked[identity], ranked=result.ranked)
    return Resolution("fuzzy", identity, left=True, ranked=result.ranked)


def priced_color(plate: str, stay_color: str | None, *, vouched: bool) -> str | None:
    """The plate type a stay is priced as (colour discounts, e.g. new energy at half price):
    the stay's colour when a binding of that colour or a certain read vouches for it, else
    only the colour its characters settle (a small new-energy plate's eight: green). A camera's
    colour guess alone never gives a blue 7-character plate, nor a yellow large new-energy
    one, the green discount."""
    return stay_color if vouched else settled_color(plate)


@dataclass(frozen=True, slots=True)
class ExitRule:
    """How a priced stay leaves: `exited_free`, `exited_pay_later` (charged `fee_fen` to
    `charge_to`, an (account, agreement)), `exited_awaiting_confirmation` (the same charge,
    recorded until an operator confirms it), or held with why (`held_unbound`,
    `held_no_agreement`, `held_arrears`, `held_over_limit`, `held_uncertain`,
    `held_no_entry_fee`) and `due_fen` at the gate."""

    outcome: Outcome
    fee_fen: int
    # The driver's open debts (known only while the account is blocked for arrears).
    debt_fen: int = 0
    charge_to: tuple[int, int] | None = None
    # The right (pass, whitelist, free minutes, discount, flat fee) the fee was reduced by.
    right: Applied | None = None
    # A charge whose reads are not both proven: it waits for the server's reader to agree
    # with the entry and exit frames (`verify_charge`) before it goes to the provider.
    verify: bool = False
    # What a merchant's validation took off the fee (what it is worth once the stay closes).
    validation_fen: int = 0

    @property
    def due_fen(self) -> int:
        """What a held exit's payment QR asks for: the stay's fee and the debts behind it."""
        return self.fee_fen + self.debt_fen


def pay_later(found: PayLater | None, fee: int) -> tuple[int, int] | Outcome:
    """(account, agreement) when a stay with a fee may leave on pay-later, else why it is held."""
    if found is None:
        return "held_unbound"
    if found.agreement_id is None or found.per_session_limit_fen is None:
        return "held_no_agreement"
    if found.service_state not in (None, "normal"):
        # Paused, overdue or not opened with the provider, or resumed only since the entry:
        # no pay-later agreement covered the stay.
        return "held_no_agreement"
    if found.blocked_for_arrears:
        return "held_arrears"
    if fee > found.per_session_limit_fen:
        return "held_over_limit"
    return found.account_id, found.agreement_id


def exit_rule(
    versions: fees.TariffVersions,
    *,
    entered_at: datetime,
    at: datetime,
    plate_color: str | None,
    fixed_fee_fen: int | None,
    pay_later_state: PayLater | None,
    reads_certain: bool,
    uncertain_policy: UncertainPolicy,
    rights: tuple[RightTerms, ...] = (),
    validation: Validation | None = None,
    reads_proven: bool = True,
    verifiable: bool = False,
    exit_certain: bool | None = None,
    earliest_at: datetime | None = None,
) -> ExitRule | None:
    """The stay's fee at `at` and how it leaves; None when the car park has no tariff for it
    (the gate holds for a person).

    `pay_later_state`: the binding of the stay's identity (plate and colour) and its agreement
    that existed when the stay began. A pay-later charge rests on the reads alone only when
    they are `reads_certain` and `reads_proven` (entry and exit certain, by calibrated
    scores). When the frames can be read again (`verifiable`: the exit sent frames), a charge
    on certain but unproven reads (an uncalibrated camera's), or on doubtful reads where the
    car park opens, or on a doubtful entry when the exit read (`exit_certain`) is certain,
    waits for the server's reader (`verify`; a person only when it does not agree): a 'hold'
    car park holds the gate only when it is not sure who is leaving. Otherwise
    `uncertain_policy` decides: 'hold' (an operator decides at the gate) or 'open_confirm'
    (the gate opens, the charge waits for an operator's confirmation). A fixed fee for a car
    with no entry record is paid at the gate: one read never charges a pay-later account.

    `rights`: the vehicle's rights here; the most favourable to the driver prices the stay
    (billing.rights), and a fee of 0 under a pass or a whitelist opens like any free stay.
    `validation`: a merchant's validation of the stay, applied after the right.

    `earliest_at`: the exit's time was not witnessed (an offline gate whose clock was proven
    wrong: `at` is the latest moment the server can prove, this the earliest). When the stay
    would cost less at it, the charge waits for an operator's confirmation: nobody is charged
    without a person for time the server cannot prove."""
    priced = fees.stay_fee(
        versions,
        entered_at=entered_at,
        at=at,
        plate_color=plate_color,
        fixed_fee_fen=fixed_fee_fen,
        rights=rights,
        validation=validation,
    )
    if priced is None:
        return None
    fee, right, taken = priced.fee_fen, priced.right, priced.validation_fen
    if fixed_fee_fen is not None:
        if fee == 0:
            return ExitRule("exited_free", 0, validation_fen=taken)
        return ExitRule("held_no_entry_fee", fee, validation_fen=taken)
    # The holder's debts are shown and asked for at the gate only when the reads surely name
    # the vehicle: otherwise the car may be a stranger's, told another driver's debts.
    debt = pay_later_state.debt_fen if pay_later_state and reads_certain else 0
    if fee == 0:
        return ExitRule("exited_free", 0, debt, right=right, validation_fen=taken)
    verdict = pay_later(pay_later_state, fee)
    if isinstance(verdict, str):
        return ExitRule(verdict, fee, debt, right=right, validation_fen=taken)
    if earliest_at is not None:
        earliest = fees.stay_fee(
            versions,
            entered_at=entered_at,
            at=max(earliest_at, entered_at),
            plate_color=plate_color,
            fixed_fee_fen=fixed_fee_fen,
            rights=rights,
            validation=validation,
        )
        if earliest is None or earliest.fee_fen < fee:
            return ExitRule(
                "exited_awaiting_confirmation", fee, debt, verdict, right, validation_fen=taken
            )
    if reads_certain and reads_proven:
        return ExitRule("exited_pay_later", fee, debt, verdict, right, validation_fen=taken)
    exit_sure = reads_certain if exit_certain is None else exit_certain
    if verifiable and (exit_sure or uncertain_policy == "open_confirm"):
        return ExitRule(
            "exited_pay_later", fee, debt, verdict, right, verify=True, validation_fen=taken
        )
    if uncertain_policy == "hold":
        return ExitRule("held_uncertain", fee, debt, right=right, validation_fen=taken)
    return ExitRule("exited_awaiting_confirmation", fee, debt, verdict, right, validation_fen=taken)


def uncertain_policy(
    car_park_policy: str, *, operator_read: bool, offline_open: bool
) -> UncertainPolicy:
    """What an exit whose charge cannot rest on two certain reads does. A car that already
    left (its gate opened offline) cannot be held; an operator deciding a held capture is
    the person a 'hold' waits for: in both the charge waits for confirmation."""
    if operator_read or offline_open:
        return "open_confirm"
    return "hold" if car_park_policy == "hold" else "open_confirm"


@dataclass(frozen=True, slots=True)
class ExitPlan:
    """How an exit read leaves, decided from its `Resolution`, the stay it resolved to and the
    car park's policies (`plan_exit`); the lane carries it out in its transaction.

    `exception`: the reason of the `lane_exceptions` row an operator decides (the gate holds,
    or for `uncertain` holds with the fee). `fixed_fee_stay`: the identity the lane opens a stay
    for at the exit under the no-entry fixed fee (the plan's `rule` prices that stay). `rule`:
    the priced stay's fee and how it leaves (None when the stay was not priced: a duplicate, an
    exception before pricing, or no tariff)."""

    outcome: Outcome
    exception: ExceptionReason | None = None
    rule: ExitRule | None = None
    fixed_fee_stay: Identity | None = None

    @property
    def needs_person(self) -> bool:
        """An operator must act: an exception at the gate, no tariff, or a charge awaiting
        confirmation (paying a fee at the gate by QR needs nobody)."""
        return self.exception is not None or self.outcome in (
            "held_no_tariff",
            "exited_awaiting_confirmation",
        )


_EXCEPTION_OUTCOME: dict[ExceptionReason, Outcome] = {
    "unreadable": "held_unreadable",
    "ambiguous": "held_ambiguous",
    "no_entry": "held_no_entry",
}


def plan_exit(
    resolution: Resolution,
    stay: OpenSession | None,
    versions: fees.TariffVersions,
    *,
    at: datetime,
    no_entry_fee_fen: int | None,
    uncertain_policy: UncertainPolicy,
    offline_open: bool = False,
    verifiable: bool = False,
    earliest_at: datetime | None = None,
) -> ExitPlan:
    """The exit decision after the read is resolved (`resolve_plate`), as the lane takes it.

    `stay`: the open stay of the resolved identity (None when there is none: a car that just
    left, no entry record, or gone since it was read). `no_entry_fee_fen`: the car park's fixed
    fee for a car with no entry record, None when its policy sends such cars to an operator.
    `offline_open`: the gate already let the car out while it could not reach us.
    `verifiable`: the exit capture sent frames the server's reader can read again
    (`verify_charge`). `earliest_at`: an offline exit's earliest provable time when the gate's
    clock was proven wrong (`exit_rule`). A doubtful exit read does not open a 'hold' car park:
    the server's reads of the frames at the gate are the same reader that made a doubtful
    read, not a second one (`frames_to_verify`).

    A car read again within the duplicate window is the same car leaving; an ambiguous or
    unreadable read, and a car with no entry record (unless the fixed-fee policy applies and
    the read is certain), wait for a person; a found stay is priced by `exit_rule`, its colour
    discount following the plate type a binding or a certain read vouches for, and its
    rights applied (a blacklisted vehicle is held for a person, before any right)."""
    status = resolution.status
    if status in ("exact", "fuzzy") and resolution.left:
        return ExitPlan("duplicate_read")
    if status == "ambiguous" or status == "unreadable":
        return ExitPlan(_EXCEPTION_OUTCOME[status], status)
    identity = resolution.identity
    fixed_fee_stay: Identity | None = None
    if stay is None:
        if no_entry_fee_fen is None or identity is None or not resolution.certain:
            # A fixed fee for a car with no entry record needs a read we are sure of (the stay
            # opened for it is that vehicle's); anything less is for a person.
            return ExitPlan("held_no_entry", "no_entry")
        fixed_fee_stay = identity
        # No entry read: never charged pay-later (exit_rule), whatever the binding.
        stay = OpenSession(0, at, None, no_entry_fee_fen, identity[1], entry_certain=False)
    assert identity is not None
    plate = identity[0]
    vouched = stay.pay_later is not None or stay.entry_certain or resolution.certain
    rule = exit_rule(
        versions,
        entered_at=stay.entered_at,
        at=at,
        plate_color=priced_color(plate, stay.plate_color, vouched=vouched),
        fixed_fee_fen=stay.fixed_fee_fen,
        pay_later_state=stay.pay_later,
        reads_certain=resolution.certain and stay.entry_certain,
        uncertain_policy=uncertain_policy,
        rights=stay.rights,
        validation=stay.validation,
        reads_proven=resolution.proven and stay.entry_proven,
        verifiable=verifiable,
        exit_certain=resolution.certain,
        earliest_at=earliest_at,
    )
    if stay.blacklisted is not None and not offline_open:
        # Blacklisted: held for a person whatever the fee (blacklist before any right).
        return ExitPlan("held_blacklisted", "blacklisted", rule, fixed_fee_stay)
    if rule is None:
        return ExitPlan("held_no_tariff", fixed_fee_stay=fixed_fee_stay)
    if rule.outcome == "exited_free":
        return ExitPlan("exited_free", rule=rule, fixed_fee_stay=fixed_fee_stay)
    if rule.charge_to is None and offline_open:
        # Left while the gate could not reach us, with no consent to charge: unpaid, for a
        # person to collect. Never a charge the driver did not agree to.
        return ExitPlan("exited_offline_unpaid", "offline_exit", rule, fixed_fee_stay)
    exception: ExceptionReason | None = "uncertain" if rule.outcome == "held_uncertain" else None
    return ExitPlan(rule.outcome, exception, rule, fixed_fee_stay)
