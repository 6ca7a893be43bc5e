"""The store interface: every backend passes the same contract test class."""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cloud.capture_budget import CaptureBudget
from cloud.captures import PAGE_BYTES, CaptureFilter, CaptureLabel, CaptureRecord
from cloud.domain import (
    AlertEventRecord,
    AlertFilter,
    AlertRecord,
    AuditEntry,
    DesiredModel,
    DeviceRecord,
    DeviceSummary,
    EnrollmentGroup,
    Lease,
    ModelRecord,
    OperatorRecord,
    PredictionRecord,
    PredictionRow,
    PresenceUpdate,
    RolloutRecord,
    RolloutTarget,
    StoredCount,
)
from cloud.maintenance import MaintenanceWindow
from cloud.selectors import Selector
from cloud.session_claims import Replacement, SessionClaim
from cloud.webhook_records import Delivery, WebhookRecord

if TYPE_CHECKING:
    from cloud.store.notify import ChangeListener

T = TypeVar("T")


class DeviceStore(abc.ABC):
    """Devices: registration, labels, enrollment (tokens and groups), certificates, presence."""

    @abc.abstractmethod
    def create_device(
        self, name: str, labels: Mapping[str, str], profile: str, now: dt.datetime
    ) -> DeviceRecord:
        """Adds a pending device; AlreadyExists when the name is taken."""

    @abc.abstractmethod
    def get_device(self, id_or_name: str) -> DeviceRecord:
        """The device with that id or name; NotFound otherwise."""

    @abc.abstractmethod
    def list_devices(self, selector: Selector | Mapping[str, str]) -> list[DeviceRecord]:
        """Devices whose labels satisfy `selector` (a mapping: every key=value), by name."""

    @abc.abstractmethod
    def device_summaries(self, ids: Collection[str] | None = None) -> list[DeviceSummary]:
        """Every device's (or those of `ids` that exist) id, name, labels, state, presence,
        certificate expiry and health, by name: what fleet-wide reads need, without building
        whole records."""

    @abc.abstractmethod
    def update_labels(
        self, id_or_name: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> DeviceRecord: ...

    @abc.abstractmethod
    def revoke_device(self, id_or_name: str, reason: str, now: dt.datetime) -> DeviceRecord:
        """Marks the device revoked (idempotent) and invalidates its open tokens."""

    @abc.abstractmethod
    def create_enrollment_group(
        self, group: EnrollmentGroup, token_hash: str
    ) -> EnrollmentGroup: ...

    @abc.abstractmethod
    def list_enrollment_groups(self) -> list[EnrollmentGroup]: ...

    @abc.abstractmethod
    def revoke_enrollment_group(self, name: str, now: dt.datetime) -> EnrollmentGroup: ...

    @abc.abstractmethod
    def enroll_in_group(
        self,
        token_hash: str,
        device_name: str,
        now: dt.datetime,
        issue: Callable[[DeviceRecord], T],
        activate: Callable[[T], tuple[str, str, dt.datetime]],
    ) -> tuple[DeviceRecord, T]:
        """Creates `device_name`, active, in the token's group; counts the use."""

    @abc.abstractmethod
    def add_enrollment_token(
        self, device_id: str, token_hash: str, now: dt.datetime, expires_at: dt.datetime
    ) -> None:
        """Stores a token hash for a pending device; older unused tokens for it stop working."""

    @abc.abstractmethod
    def enroll(
        self,
        token_hash: str,
        now: dt.datetime,
        issue: Callable[[DeviceRecord], T],
        activate: Callable[[T], tuple[str, str, dt.datetime]],
    ) -> tuple[DeviceRecord, T]:
        """Atomically: check the token (Unauthenticated if unknown, used or expired), call
        `issue` for the device, mark the token used and the device active with the
        (serial, fingerprint, not after) that `activate` returns. Nothing changes when
        `issue` raises."""

    @abc.abstractmethod
    def renew_certificate(
        self,
        device_id: str,
        presented: str,
        now: dt.datetime,
        grace: dt.timedelta,
        issue: Callable[[DeviceRecord], T],
        activate: Callable[[T], tuple[str, str, dt.datetime]],
    ) -> tuple[DeviceRecord, T]:
        """Atomically: check that the active device accepts the `presented` certificate
        (PermissionDenied if not), call `issue`, and make what `activate` returns current;
        the certificate presented stays accepted for `grace` (a retry after a lost answer
        renews again from it)."""

    @abc.abstractmethod
    def record_presence(self, updates: Sequence[PresenceUpdate]) -> None:
        """Applies heartbeat summaries in one transaction; unknown devices are skipped."""

    @abc.abstractmethod
    def delete_device(self, id_or_name: str) -> DeviceRecord:
        """Removes a device that is revoked or never enrolled, with everything stored of it
        (FailedPrecondition for an active one, or one in an active rollout)."""

    @abc.abstractmethod
    def record_cert_expiry(self, device_id: str, fingerprint: str, not_after: dt.datetime) -> None:
        """Sets the expiry of the device's current certificate (`fingerprint`) where none is
        recorded (devices enrolled before it was)."""

    @abc.abstractmethod
    def forget_previous_certificate(self, device_id: str, current: str) -> None:
        """The device used its current certificate (`current`): the one it renewed from is
        refused from now on."""

    @abc.abstractmethod
    def device_credentials(
        self, device_ids: Sequence[str], now: dt.datetime
    ) -> dict[str, tuple[bool, frozenset[str]]]:
        """For each device id found: (may act -- enrolled and not revoked, the certificate
        fingerprints it accepts now: the current one, and the one it renewed from while the
        renewal's grace lasts). Replicas compare open sessions against it."""

    @abc.abstractmethod
    def revoked_since(self, since: dt.datetime) -> list[str]:
        """Ids of devices revoked at or after `since` (for sessions held by other replicas)."""


class RecordStore(abc.ABC):
    """What devices sync: predictions, alert events and window captures, each stored once
    per device and sequence."""

    @abc.abstractmethod
    def store_records(
        self,
        device_id: str,
        predictions: Sequence[PredictionRecord],
        alerts: Sequence[AlertEventRecord],
        now: dt.datetime,
        through: int = 0,
        captures: Sequence[CaptureRecord] = (),
        prediction_rows: Sequence[PredictionRow] = (),
        budget: CaptureBudget | None = None,
    ) -> StoredCount:
        """Stores each (device, sequence) once, in one transaction: records stored before
        are counted as duplicates and left as they were. The stored position moves to at
        least `through` (past records of the batch that were rejected). `prediction_rows`
        are more predictions, as the sync path builds them (`cloud.domain.PredictionRow`).
        Captures not stored yet are charged to the device's daily budget in the same
        transaction (`charge_captures`): those past it are not stored (`StoredCount.refused`
        says why), and a batch that fails to store is not charged."""

    @abc.abstractmethod
    def list_captures(
        self,
        where: CaptureFilter,
        after: tuple[str, int] = ("", 0),
        limit: int = 200,
        max_bytes: int = PAGE_BYTES,
    ) -> list[CaptureRecord]:
        """Captures whose window ends at or after `where.since`, of `where.device_ids`, by
        (device id, sequence) after the cursor `after` (the verdict is not filtered here):
        at most `limit`, and no more than `max_bytes` of them in memory (`held_bytes`; the
        first is returned whatever its size)."""

    @abc.abstractmethod
    def charge_captures(
        self,
        device_id: str,
        captures: Sequence[CaptureRecord],
        now: dt.datetime,
        budget: CaptureBudget | None = None,
    ) -> dict[int, str]:
        """Charges the captures not stored yet to the device's budget for the UTC day of
        `now` (`cloud.capture_budget`, DAY_BUDGET when None), in sequence order; the reasons
        of those past it by sequence (refuse them; store the rest). NotFound: no such device."""

    @abc.abstractmethod
    def capture_labels(
        self, device_id: str, alert_keys: Sequence[str], since: dt.datetime
    ) -> dict[str, CaptureLabel]:
        """For edge alert keys of the device: the alert each raise folded into (alerts last
        seen at or after `since`) with its verdict; keys with no alert are left out."""

    @abc.abstractmethod
    def last_record_sequence(self, device_id: str) -> int:
        """The highest sequence stored for the device (0 when none)."""

    @abc.abstractmethod
    def list_predictions(
        self,
        device_id: str,
        asset: str = "",
        since: dt.datetime | None = None,
        limit: int = 1000,
        until: dt.datetime | None = None,
        before_sequence: int = 0,
    ) -> list[PredictionRecord]:
        """The newest `limit` whose window ends in [since, until] (and whose sequence is
        below `before_sequence`, when that is above 0), newest last, by sequence."""

    @abc.abstractmethod
    def list_alert_events(
        self, device_id: str = "", since: dt.datetime | None = None, limit: int = 1000
    ) -> list[AlertEventRecord]:
        """By device, then sequence."""


class AlertStore(abc.ABC):
    """Alerts, folded from edge events by `store_records` (`cloud/alerts.py`), and what
    operators do with them."""

    @abc.abstractmethod
    def list_alerts(self, where: AlertFilter, limit: int = 100) -> list[AlertRecord]:
        """Matching alerts, most recently seen first."""

    @abc.abstractmethod
    def get_alert(self, alert_id: str) -> AlertRecord: ...

    @abc.abstractmethod
    def alerts_after(self, revision: int, limit: int = 500) -> list[AlertRecord]:
        """Alerts whose latest change is after `revision`, in revision order."""

    @abc.abstractmethod
    def alert_revision(self) -> int:
        """The latest alert revision (0 before any alert)."""

    @abc.abstractmethod
    def update_alert(
        self,
        alert_id: str,
        action: str,
        note: str,
        by: str,
        now: dt.datetime,
        verdict: str = "",
        fault_type: str = "",
    ) -> AlertRecord:
        """`action` "ack" or "resolve" by operator `by`, with an optional note and verdict;
        a returned alert closes on either. FailedPrecondition when the alert is resolved
        already, unless a verdict is given (recorded, the state stays)."""

    @abc.abstractmethod
    def shelve_alert(
        self, alert_id: str, until: dt.datetime, reason: str, by: str, now: dt.datetime
    ) -> AlertRecord: ...

    @abc.abstractmethod
    def unshelve_alert(self, alert_id: str, by: str, now: dt.datetime) -> AlertRecord: ...

    @abc.abstractmethod
    def release_suppressed(self, now: dt.datetime) -> list[AlertRecord]:
        """Ends expired shelvings and delivers alerts whose shelving or window has ended."""


class MaintenanceStore(abc.ABC):
    """Maintenance windows and out-of-service assets."""

    @abc.abstractmethod
    def add_maintenance(
        self,
        selector: str,
        asset: str,
        starts_at: dt.datetime,
        ends_at: dt.datetime | None,
        reason: str,
        by: str,
        now: dt.datetime,
    ) -> MaintenanceWindow: ...

    @abc.abstractmethod
    def list_maintenance(self, now: dt.datetime, include_ended: bool) -> list[MaintenanceWindow]:
        """Oldest first; without `include_ended`, those active now or later."""

    @abc.abstractmethod
    def remove_maintenance(self, window_id: str) -> MaintenanceWindow: ...


class WebhookOutbox(abc.ABC):
    """Alert targets and the transactional outbox of their deliveries."""

    @abc.abstractmethod
    def add_webhook(
        self, url: str, secret: str, filter_text: str, now: dt.datetime, kind: str = "standard"
    ) -> WebhookRecord: ...

    @abc.abstractmethod
    def rotate_webhook_secret(
        self, webhook_id: str, secret: str, previous_until: dt.datetime
    ) -> WebhookRecord: ...

    @abc.abstractmethod
    def prune_deliveries(self, before: dt.datetime) -> int:
        """Deletes delivered and dead changes of closed alerts queued before `before`."""

    @abc.abstractmethod
    def rearm_deliveries(self, kind: str, sent_before: dt.datetime, now: dt.datetime) -> int:
        """Queues again the last change of active alerts sent to `kind` webhooks before
        `sent_before`; how many."""

    @abc.abstractmethod
    def list_webhooks(self) -> list[WebhookRecord]:
        """Oldest first, with delivery counts."""

    @abc.abstractmethod
    def remove_webhook(self, webhook_id: str) -> WebhookRecord:
        """Removes it and its queued deliveries; NotFound when unknown."""

    @abc.abstractmethod
    def claim_deliveries(
        self,
        now: dt.datetime,
        lease: dt.timedelta,
        limit: int,
        per_webhook: int | None = None,
        busy: Mapping[str, int] | None = None,
    ) -> list[Delivery]:
        """Up to `limit` due deliveries, each the oldest pending one of its webhook and
        alert, taken in turns by device (every device's oldest before any device's second:
        one device's backlog delays no other's alerts), oldest first within a turn; leased
        until `now + lease` (`Delivery.leased_until`: no other claim takes them meanwhile)
        and counted as attempted. With `per_webhook`, at most
        that many of one webhook less those the caller already holds of it (`busy`, by
        webhook id): a webhook's deliveries past its share are left for later, not claimed."""

    @abc.abstractmethod
    def release_delivery(
        self, delivery_id: int, leased_until: dt.datetime, due: dt.datetime
    ) -> bool:
        """A claimed delivery the claimer did not send: pending again from `due`, its claim's
        attempt not counted and its last error (the receiver's) kept. False, changing
        nothing, when that claim is over (its lease lapsed and it was claimed again, it was
        finished, or its webhook removed)."""

    @abc.abstractmethod
    def finish_delivery(
        self,
        delivery_id: int,
        error: str,
        now: dt.datetime,
        retry_at: dt.datetime | None,
        leased_until: dt.datetime | None = None,
    ) -> None: ...


class LeaseStore(abc.ABC):
    """Leases: leader election without Kubernetes."""

    @abc.abstractmethod
    def try_lease(
        self, name: str, holder: str, now: dt.datetime | None, duration: dt.timedelta
    ) -> Lease:
        """Takes or renews the lease when free, expired or `holder`'s; returns it as it is.
        `now` None: the database's clock, the one every replica shares."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str, now: dt.datetime | None) -> None:
        """Lets `holder`'s lease expire at `now` (None: the database's clock)."""

    @abc.abstractmethod
    def get_lease(self, name: str) -> Lease | None: ...


class SessionClaimStore(abc.ABC):
    """The newest session of each device across replicas (`cloud.session_claims`)."""

    @abc.abstractmethod
    def claim_session(
        self, device_id: str, replica: str, peer: str, now: float, replacing: bool
    ) -> tuple[SessionClaim, Replacement | None]:
        """The device's next generation, for a session opening now on `replica`; every
        replica is told (the one holding an older session ends it). With `replacing` (this
        replica holds one itself, which the new one ends) the replacement is counted, and
        what it means returned. NotFound when the device is gone."""

    @abc.abstractmethod
    def count_replacement(self, device_id: str, now: float) -> tuple[SessionClaim, Replacement]:
        """Counts a replacement found by the replica holding an older session: the newest
        session's claim, and what the replacement means. NotFound when there is no claim."""

    @abc.abstractmethod
    def newest_sessions(self, device_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """(generation, replica) of the newest session of each device that has one."""


class ModelStore(abc.ABC):
    """The model catalog: pushed versions."""

    @abc.abstractmethod
    def add_model(self, model: ModelRecord) -> ModelRecord:
        """Adds a pushed model; pushing the same manifest again returns the stored record,
        another manifest under a taken name:version is AlreadyExists."""

    @abc.abstractmethod
    def get_model(self, name: str, version: str) -> ModelRecord:
        """NotFound when not pushed."""

    @abc.abstractmethod
    def list_models(self, name: str = "") -> list[ModelRecord]:
        """By name, then push time."""

    @abc.abstractmethod
    def delete_model(self, name: str, version: str) -> ModelRecord:
        """Removes a pushed version (FailedPrecondition while a device's desired state or a
        rollout names it; NotFound when unknown)."""


class RolloutStore(abc.ABC):
    """Rollouts, their targets, and the desired-state feed every replica follows."""

    @abc.abstractmethod
    def set_desired(self, desired: Sequence[DesiredModel]) -> list[DesiredModel]:
        """Replaces the desired model of each device named, in one transaction; returns them
        with the feed revisions they took."""

    @abc.abstractmethod
    def get_desired(self, device_id: str) -> DesiredModel | None: ...

    @abc.abstractmethod
    def desired_for(self, device_ids: Sequence[str]) -> dict[str, DesiredModel]:
        """Device id -> desired model, for those of `device_ids` that have one (read in bulk,
        for a device listing)."""

    @abc.abstractmethod
    def desired_after(self, revision: int, limit: int = 500) -> list[DesiredModel]:
        """Desired states changed after `revision`, oldest change first (the change feed
        every replica follows to deliver them to the sessions it holds)."""

    @abc.abstractmethod
    def desired_revision(self) -> int:
        """The newest desired-state revision (0 before any)."""

    @abc.abstractmethod
    def create_rollout(self, rollout: RolloutRecord, targets: Sequence[RolloutTarget]) -> None:
        """Atomically: FailedPrecondition when a target is in another active rollout."""

    @abc.abstractmethod
    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        """NotFound when unknown."""

    @abc.abstractmethod
    def list_rollouts(self, active_only: bool = False) -> list[RolloutRecord]:
        """Newest first."""

    @abc.abstractmethod
    def save_rollout(
        self,
        rollout: RolloutRecord,
        targets: Sequence[RolloutTarget] = (),
        desired: Sequence[DesiredModel] = (),
        *,
        from_shadow: bool = False,
    ) -> tuple[RolloutRecord, list[DesiredModel]]:
        """Updates the rollout, the given targets and desired states in one transaction, by
        compare-and-set: Conflict (nothing written) when the rollout or a target changed
        since the revision it was read at. With `from_shadow` (an ended rollout serving its
        version to a device that installed it in shadow late) also when a device's desired
        state is no longer this rollout's shadow one: another rollout may have taken it.
        Returns the rollout at its new revision and the desired states with their feed
        revisions."""

    @abc.abstractmethod
    def record_shadow(
        self, rollout_id: str, device_id: str, shadow: dict[str, Any], enough: int = 1
    ) -> bool:
        """Replaces a target's latest shadow report only: no revision bump, so the frequent
        reports of a large wave never make the leader's compare-and-set fail (a target's
        other writes keep the stored report, whatever they read). A report of fewer windows
        than the stored one and fewer than `enough` (what the gate needs) replaces nothing:
        an agent that restarted, or lost its rows to a gap, counts again from 0. Returns
        whether it was stored."""

    @abc.abstractmethod
    def save_target(self, target: RolloutTarget) -> RolloutTarget:
        """Compare-and-set of one target (a device's report); Conflict when it changed."""

    @abc.abstractmethod
    def rollout_targets(self, rollout_id: str) -> list[RolloutTarget]:
        """By wave, then device id."""

    @abc.abstractmethod
    def rollout_target(self, rollout_id: str, device_id: str) -> RolloutTarget | None:
        """One device of a rollout; None when it is not a target."""


class OperatorStore(abc.ABC):
    """Operators, their tokens and roles, and the audit log."""

    @abc.abstractmethod
    def add_operator(
        self, name: str, token_hash: str, now: dt.datetime, role: str = "admin"
    ) -> OperatorRecord:
        """AlreadyExists when the name is taken."""

    @abc.abstractmethod
    def list_operators(self) -> list[OperatorRecord]:
        """By name, revoked ones too."""

    @abc.abstractmethod
    def revoke_operator(self, name: str, now: dt.datetime) -> OperatorRecord:
        """NotFound when there is none; FailedPrecondition for the last active admin."""

    @abc.abstractmethod
    def add_audit(self, entry: AuditEntry) -> None: ...

    @abc.abstractmethod
    def prune_audit(self, before: dt.datetime) -> int:
        """Deletes audit entries older than `before`; how many."""

    @abc.abstractmethod
    def list_audit(self, since: dt.datetime | None, operator: str, limit: int) -> list[AuditEntry]:
        """Newest first."""

    @abc.abstractmethod
    def operator_by_token_hash(self, token_hash: str) -> OperatorRecord:
        """The operator holding that token; Unauthenticated when none (or revoked)."""


class Store(
    DeviceStore,
    RecordStore,
    AlertStore,
    MaintenanceStore,
    WebhookOutbox,
    LeaseStore,
    SessionClaimStore,
    ModelStore,
    RolloutStore,
    OperatorStore,
):
    """Durable control-plane state, one interface per aggregate (above) that components
    may depend on alone. Methods raise errors from `edge_agent.errors`; every backend passes
    the same contract test."""

    @property
    @abc.abstractmethod
    def shared(self) -> bool:
        """Whether several control-plane processes can use this store at once."""

    def change_listener(self, on_change: Callable[[str], None]) -> ChangeListener | None:
        """A listener for other replicas' changes (`cloud.store.notify`), not yet started;
        None where no other process can write (SQLite)."""
        return None

    @abc.abstractmethod
    def state_counts(self) -> dict[str, dict[str, int]]:
        """Rows by state of devices, rollouts, alerts and webhook_deliveries (for metrics)."""

    @abc.abstractmethod
    def close(self) -> None: ...
