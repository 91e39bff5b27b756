/* A process under seccomp strict mode (only read, write, exit and sigreturn allowed): it
 * prints "READY" and then echoes each line it reads from stdin. Any other syscall, such as
 * one a checkpoint would inject, kills it with SIGKILL. */
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(void) {
    char buf[256];
    if (write(1, "READY\n", 6) != 6)
        return 2;
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0)
        return 2;
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0 || write(1, buf, n) != n)
            break;
    }
    return 0;    /* exit_group is not allowed in strict mode: the kernel kills it, harmlessly */
}
