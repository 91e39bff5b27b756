"""The checkpointed set of tasks, in the image's tree order, and the TREE section."""
from __future__ import annotations

from ..kinds.tasktree import TREE, TREE_NESTED


def tree_order(root) -> list:
    """Depth-first: a leader, its other threads, then each child's group, children by pid."""
    out = []

    def visit(leader) -> None:
        out.append(leader)
        out.extend(th for th in leader.threads if th is not leader)
        for child in sorted(leader.children, key=lambda c: c.tid):
            visit(child)

    visit(root.leader)
    return out


def pid_entry(ctx, t) -> tuple:
    leader = t.leader
    parent = leader.parent
    vppid = ctx.vpid(parent.leader) if parent is not None and parent.leader in ctx.members else 0
    depth = t.pid.ns.level - ctx.ns.level
    return (ctx.vpid(t), vppid, ctx.vpid(leader), ctx.vpid_of(leader.pgrp),
            ctx.vpid_of(leader.session), depth)


def write_tree(ctx) -> None:
    ctx.members = {t for t in ctx.tasks}
    entries = [pid_entry(ctx, t) for t in ctx.tasks]
    ctx.write(TREE, nr_tasks=len(entries), var=entries)
    tree_bytes = b"".join(TREE.item_struct.pack(*e) for e in entries)
    nested = []
    for t, entry in zip(ctx.tasks, entries):
        depth = entry[5]
        # numbers below the checkpoint namespace, outermost first
        nested.extend(t.pid.numbers[ctx.ns.level + 1 + i][1] for i in range(depth))
    if nested:
        ctx.write(TREE_NESTED, var=[(n,) for n in nested])
        tree_bytes += b"".join(TREE_NESTED.item_struct.pack(n) for n in nested)
    ctx.tree_bytes = tree_bytes  # names the tree for a child image (cr/incremental.py)
