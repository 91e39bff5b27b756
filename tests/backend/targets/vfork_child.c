/* A process whose vfork child has not exec'd yet: the two share one address space (the
 * parent waits in vfork until the child execs or exits). The child prints
 * "READY child=PID" with write(2) and pauses until it is killed.
 * (pause() in a vfork child is outside POSIX but fine on Linux: only the child runs.) */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    pid_t pid = vfork();
    if (pid == 0) {
        char line[64];
        int n = snprintf(line, sizeof line, "READY child=%d\n", (int)getpid());
        if (write(1, line, n) != n)
            _exit(2);
        for (;;)
            pause();
    }
    return 0;
}
