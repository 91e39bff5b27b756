"""Credentials: CRED and GROUPINFO objects, TASK_CREDS per task.

Objrefs: a ``Cred`` is immutable, so two tasks holding equal credentials cannot be told
apart; the checkpoint merges equal ``Cred`` values (even distinct Python objects) into one
objref, and likewise equal supplementary group lists into one GROUPINFO. After restart, tasks
that had equal credentials share one ``Cred`` object. ``Cred`` is not a ``Shared``: it has no
reference count, so it takes no part in leak detection (like Linux-CR, which never counted
creds as leaks either).

Privilege: restart never grants more than the restarting caller (``ctx.caller``) holds. An
image credential is accepted only if the caller could reach it with set*id/setgroups/capset:
each uid must be one of the caller's (or the caller has CAP_SETUID), each gid likewise (or
CAP_SETGID), other groups need CAP_SETGID, capabilities must lie within the caller's
permitted/bounding sets, and other securebits need CAP_SETPCAP. Otherwise EPERM.
"""
from __future__ import annotations

import errno
import weakref
from dataclasses import dataclass

from ..image.schema import ENUMS, layout
from ..image.types import ObjType
from ..model.creds import (
    CAP_FULL_SET, CAP_NAMES, CAP_SETGID, CAP_SETPCAP, CAP_SETUID, ID_MAX, NGROUPS_MAX,
    SECURE_ALL_BITS, Cred)
from .registry import Kind, register

ENUMS["caps"] = {1 << cap: "CAP_" + name for cap, name in enumerate(CAP_NAMES)}
ENUMS["securebits"] = {1: "NOROOT", 2: "NOROOT_LOCKED", 4: "NO_SETUID_FIXUP",
                       8: "NO_SETUID_FIXUP_LOCKED", 16: "KEEP_CAPS", 32: "KEEP_CAPS_LOCKED"}

CRED = layout(114, "CRED", [
    ("uid", "u32"), ("suid", "u32"), ("euid", "u32"), ("fsuid", "u32"),
    ("gid", "u32"), ("sgid", "u32"), ("egid", "u32"), ("fsgid", "u32"),
    ("groupinfo_ref", "i32", "objref:GROUPINFO"), ("securebits", "u32", "flags:securebits"),
    ("cap_inheritable", "u64", "flags:caps"), ("cap_permitted", "u64", "flags:caps"),
    ("cap_effective", "u64", "flags:caps"), ("cap_bounding", "u64", "flags:caps"),
], subsystem="task")
GROUPINFO = layout(116, "GROUPINFO", [("ngroups", "u32"), ("pad", "u32")], var=[("gid", "u32")],
                   max_var=NGROUPS_MAX * 4, subsystem="task")
TASK_CREDS = layout(117, "TASK_CREDS", [
    ("cred_ref", "i32", "objref:CRED"), ("ecred_ref", "i32", "objref:CRED"),
], subsystem="task")


@dataclass(frozen=True)
class GroupInfo:
    """A task's supplementary groups as a shared object of the image (Linux's group_info)."""

    gids: tuple[int, ...]


# Per checkpoint context: value -> the one object saved for it (equal values share an objref).
_canonical: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _canonical_of(ctx, value):
    table = _canonical.setdefault(ctx, {})
    return table.setdefault(value, value)


# -- GROUPINFO ----------------------------------------------------------------------------------
def save_groupinfo(ctx, info: GroupInfo) -> None:
    ctx.write(GROUPINFO, ngroups=len(info.gids), pad=0, var=[(g,) for g in info.gids])


def load_groupinfo(ctx) -> GroupInfo:
    rec = ctx.read(GROUPINFO)
    gids = tuple(g for (g,) in rec.var)
    if rec["ngroups"] != len(gids):
        raise ctx.image_error(f"GROUPINFO says {rec['ngroups']} groups, holds {len(gids)}")
    if list(gids) != sorted(gids) or any(g > ID_MAX for g in gids):
        raise ctx.image_error("GROUPINFO gids are not sorted valid ids")
    return GroupInfo(gids)


# -- CRED -----------------------------------------------------------------------------------------
def save_cred(ctx, cred: Cred) -> None:
    groups_ref = ctx.ref(_canonical_of(ctx, GroupInfo(cred.groups)))  # before CRED refers to it
    ctx.write(CRED, uid=cred.uid, suid=cred.suid, euid=cred.euid, fsuid=cred.fsuid,
              gid=cred.gid, sgid=cred.sgid, egid=cred.egid, fsgid=cred.fsgid,
              groupinfo_ref=groups_ref, securebits=cred.securebits,
              cap_inheritable=cred.cap_inheritable, cap_permitted=cred.cap_permitted,
              cap_effective=cred.cap_effective, cap_bounding=cred.cap_bounding)


def load_cred(ctx) -> Cred:
    rec = ctx.read(CRED)
    groups = ctx.obj(rec["groupinfo_ref"], ObjType.GROUPINFO)
    if groups is None:
        raise ctx.image_error("CRED without GROUPINFO")
    ids = [rec[name] for name in ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid")]
    if any(i > ID_MAX for i in ids):
        raise ctx.image_error("CRED holds an invalid id (-1)")
    caps = [rec[f"cap_{name}"] for name in ("inheritable", "permitted", "effective", "bounding")]
    if any(c & ~CAP_FULL_SET for c in caps) or rec["securebits"] & ~SECURE_ALL_BITS:
        raise ctx.image_error("CRED holds unknown capability or securebits")
    cred = Cred(*ids[:4], *ids[4:], groups=groups.gids, cap_inheritable=caps[0],
                cap_permitted=caps[1], cap_effective=caps[2], cap_bounding=caps[3],
                securebits=rec["securebits"])
    if cred.cap_effective & ~cred.cap_permitted:
        raise ctx.image_error("CRED effective capabilities outside permitted")
    problem = privilege_excess(ctx.caller.cred, cred)
    if problem:
        ctx.fail(errno.EPERM, f"restart would grant {problem} ({cred.describe()})")
    return cred


def privilege_excess(caller: Cred, wanted: Cred) -> str:
    """What ``wanted`` holds that ``caller`` could not give itself; "" if nothing."""
    if not caller.has_cap(CAP_SETUID):
        own = {caller.uid, caller.euid, caller.suid}
        bad = [u for u in wanted.uids() if u not in own and u != caller.fsuid]
        if bad:
            return f"uid {bad[0]} without CAP_SETUID"
    if not caller.has_cap(CAP_SETGID):
        own = {caller.gid, caller.egid, caller.sgid}
        bad = [g for g in wanted.gids() if g not in own and g != caller.fsgid]
        if bad:
            return f"gid {bad[0]} without CAP_SETGID"
        if wanted.groups != caller.groups:
            return "other supplementary groups without CAP_SETGID"
    if wanted.cap_permitted & ~caller.cap_permitted:
        return f"capabilities {wanted.cap_permitted & ~caller.cap_permitted:#x} beyond permitted"
    if wanted.cap_bounding & ~caller.cap_bounding:
        return "a larger capability bounding set"
    allowed_inheritable = caller.cap_inheritable | (
        caller.cap_bounding if caller.has_cap(CAP_SETPCAP) else caller.cap_permitted)
    if wanted.cap_inheritable & ~allowed_inheritable:
        return "inheritable capabilities beyond the caller's"
    if wanted.securebits != caller.securebits and not caller.has_cap(CAP_SETPCAP):
        return "other securebits without CAP_SETPCAP"
    return ""


# -- per task ---------------------------------------------------------------------------------------
def save_task_creds(ctx, task) -> None:
    # The model has one credential per task: Linux's real_cred and cred are the same object.
    cred = _canonical_of(ctx, task.cred)
    ref = ctx.ref(cred)
    ctx.write(TASK_CREDS, cred_ref=ref, ecred_ref=ctx.ref(cred))


def load_task_creds(ctx, task) -> None:
    rec = ctx.read(TASK_CREDS)
    if rec["cred_ref"] != rec["ecred_ref"]:
        raise ctx.image_error("distinct real and effective credentials are not modelled")
    cred = ctx.obj(rec["cred_ref"], ObjType.CRED)
    if cred is None:
        raise ctx.image_error("TASK_CREDS without a credential")
    task.cred = cred


register(Kind(name="groupinfo", objtype=ObjType.GROUPINFO, model_types=(GroupInfo,),
              layouts=(GROUPINFO,), save_object=save_groupinfo, load_object=load_groupinfo,
              doc="supplementary group lists (shared by equal value)"))
register(Kind(name="cred", objtype=ObjType.CRED, model_types=(Cred,), layouts=(CRED,),
              save_object=save_cred, load_object=load_cred,
              doc="immutable credentials, shared by equal value; checked against the caller"))
register(Kind(name="creds", layouts=(TASK_CREDS,), task_order=10, save_task=save_task_creds,
              load_task=load_task_creds, doc="each task's credential reference"))
