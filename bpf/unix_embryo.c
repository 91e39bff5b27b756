/* The queued data of not yet accepted AF_UNIX connections ("embryos"): a BPF iterator over
 * the unix sockets of the reader's network namespace (iter/unix, Linux >= 5.17), loaded by
 * backend/unix_embryo.py with bcc. For each embryo of a listener whose inode is in
 * `listeners`, it writes one EMB record, then one SKB record per queued buffer with the
 * buffer's linear bytes, then an END record. Nothing is taken from the queue: kernel memory
 * is only read (bpf_probe_read_kernel), under the socket lock the iterator holds.
 *
 * Kernel struct offsets come from the running kernel's BTF as -D macros (OFF_*): bcc compiles
 * against older headers whose layouts differ. One object's output must fit the iterator's
 * seq buffer (8 pages): a pass writes at most BUDGET bytes of data per embryo and MAX_SKBS
 * buffers, and END says where the next pass starts (`cursor`, set by the reader).
 */

#define MAGIC_EMB 0x424d4555u   /* "UEMB" */
#define MAGIC_SKB 0x424b5355u   /* "USKB" */
#define MAGIC_END 0x444e4555u   /* "UEND" */
#define MAGIC_BAD 0x44414255u   /* "UBAD": the buffer just sent could not be read whole */
#define MAX_COPY (20 * 1024)    /* a linear buffer up to 20 KiB (seqpacket: < 16 KiB) */
#define COPY_MASK 0x7fff        /* the bound the verifier sees on a copy's size */
#define MAX_SKBS 32             /* per embryo and pass */
#define BUDGET (20 * 1024)      /* data bytes per embryo and pass */
_Static_assert(MAX_COPY <= BUDGET, "a pass's first buffer fits its budget");

#define SKB_FLAG_NONLINEAR 1    /* part of the data in page frags: not copied */
#define SKB_FLAG_FILES 2        /* carries SCM_RIGHTS files: not copied */
#define SKB_FLAG_TOO_BIG 4      /* linear part longer than MAX_COPY: not copied */

struct iter_meta { void *seq; u64 session_id; u64 seq_num; };
struct bpf_iter__unix { struct iter_meta *meta; void *unix_sk; u32 uid; };

struct emb_rec {
    u32 magic, qlen;
    u64 listener_ino, peer_ino, id;
    u32 state, type;
    u64 oob_skb;
};

struct skb_rec {
    u32 magic, index;
    u32 len, data_len, consumed, flags;
    u32 copied, pad;
};

struct end_rec {
    u32 magic, walked;      /* buffers written by this pass */
    u64 id;
    u64 next;               /* not 0: the buffer the next pass starts at (`cursor`) */
};

/* sizes are masked, not clamped; 32 KiB is the most a per-cpu map value may be */
struct chunk { char data[COPY_MASK + 1]; };

BPF_HASH(listeners, u64, u8, 1024);        /* inodes of the listeners asked about */
/* embryo id -> the buffer this pass starts at; key 0 present: a later pass, only for these */
BPF_HASH(cursor, u64, u64, 4096);
BPF_PERCPU_ARRAY(buf, struct chunk, 1);

#define RD(dst, addr) bpf_probe_read_kernel(&(dst), sizeof(dst), (const void *)(addr))

static __always_inline u64 sock_ino(u64 sk)
{
    u64 socket = 0, ino = 0;
    if (!sk || RD(socket, sk + OFF_SK_SOCKET) || !socket)
        return 0;
    RD(ino, socket + OFF_SOCKET_INODE + OFF_I_INO);
    return ino;
}

BPF_ITER(unix)
{
    void *seq = ctx->meta->seq;
    u64 sk = (u64)ctx->unix_sk;
    u64 socket = 1, lis = 0;
    if (!sk)
        return 0;
    if (RD(socket, sk + OFF_SK_SOCKET) || socket)      /* has a file: not an embryo */
        return 0;
    if (RD(lis, sk + OFF_U_LISTENER) || !lis)
        return 0;
    struct emb_rec e = {};
    e.listener_ino = sock_ino(lis);
    if (!listeners.lookup(&e.listener_ino))
        return 0;
    e.magic = MAGIC_EMB;
    e.id = sk;
    u64 peer = 0;
    RD(peer, sk + OFF_U_PEER);
    e.peer_ino = sock_ino(peer);
    u8 state = 0;
    u16 type = 0;
    RD(state, sk + OFF_SK_STATE);
    RD(type, sk + OFF_SK_TYPE);
    e.state = state;
    e.type = type;
    RD(e.oob_skb, sk + OFF_U_OOB_SKB);
    RD(e.qlen, sk + OFF_SK_RQUEUE + OFF_HEAD_QLEN);
    u64 *startp = cursor.lookup(&e.id);
    u64 resume_key = 0;
    if (!startp && cursor.lookup(&resume_key))
        return 0;           /* a later pass: only the embryos not finished yet */
    bpf_seq_write(seq, &e, sizeof(e));

    u32 zero = 0;
    struct chunk *c = buf.lookup(&zero);
    struct end_rec end = {};
    end.magic = MAGIC_END;
    end.id = sk;
    if (!c) {
        bpf_seq_write(seq, &end, sizeof(end));   /* walked 0: the count check refuses */
        return 0;
    }
    u64 head = sk + OFF_SK_RQUEUE;
    u64 skb = 0;
    if (startp && *startp)
        skb = *startp;                           /* where the last pass stopped */
    else
        RD(skb, head);
    u32 index = 0, budget = BUDGET, i;
    for (i = 0; i < MAX_SKBS; i++) {
        if (skb == head || !skb)
            break;
        struct skb_rec r = {};
        u64 data = 0, fp = 0;
        r.magic = MAGIC_SKB;
        r.index = index;            /* in this pass */
        RD(r.len, skb + OFF_SKB_LEN);
        RD(r.data_len, skb + OFF_SKB_DATA_LEN);
        RD(data, skb + OFF_SKB_DATA);
        RD(fp, skb + OFF_SKB_CB + OFF_UCB_FP);
        RD(r.consumed, skb + OFF_SKB_CB + OFF_UCB_CONSUMED);
        u32 headlen = r.len - r.data_len;
        /* the verifier follows this loop once per buffer, and a branch it can decide makes
         * the values it reads precise (states that differ in them are not pruned): so no
         * branch tests the flags, a refused buffer leaves `budget` alone, and the copy is
         * one read and one write (a chunked copy made it ~370k insns) */
        if (r.data_len || fp || headlen > MAX_COPY) {
            if (r.data_len)
                r.flags |= SKB_FLAG_NONLINEAR;
            if (fp)
                r.flags |= SKB_FLAG_FILES;
            if (headlen > MAX_COPY)
                r.flags |= SKB_FLAG_TOO_BIG;
            bpf_seq_write(seq, &r, sizeof(r));   /* copied 0 */
        } else {
            if (i > 0 && headlen > budget)
                break;                           /* for the next pass */
            r.copied = headlen;
            bpf_seq_write(seq, &r, sizeof(r));
            u64 n = headlen;
            /* a bound the verifier sees on the register the calls use (clang drops a plain
             * mask it can prove useless, and clamps a copy) */
            asm volatile("%0 &= %1" : "+r"(n) : "i"(COPY_MASK));
            /* a failed read zeroes c->data: the announced bytes still go out (the stream
             * stays in step) and a BAD record after them makes the reader refuse */
            int bad = n ? bpf_probe_read_kernel(c->data, n, (const void *)data) : 0;
            bpf_seq_write(seq, c->data, n);
            if (bad) {
                struct end_rec b = {};
                b.magic = MAGIC_BAD;
                b.walked = index;
                bpf_seq_write(seq, &b, sizeof(b));
            }
            budget -= headlen;                   /* fits: checked, or the first (MAX_COPY) */
        }
        RD(skb, skb);
        index++;
    }
    end.walked = index;
    end.next = skb != head ? skb : 0;
    bpf_seq_write(seq, &end, sizeof(end));
    return 0;
}
