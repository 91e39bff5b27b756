/* A target with varied signal actions, for comparing ways of reading them: handlers with
 * SA_SIGINFO/SA_RESTART/SA_ONSTACK and masks, ignored signals (one with flags), SIG_DFL set
 * with flags and a mask, and a SA_RESETHAND handler that has fired (back to SIG_DFL, its
 * flags kept). Prints "READY pid=N" and waits in pause(). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_signal(int sig) { (void)sig; }
static void on_info(int sig, siginfo_t *si, void *uc) { (void)sig; (void)si; (void)uc; }

static void set(int sig, void (*handler)(int), int flags, int masked1, int masked2)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (masked1) sigaddset(&sa.sa_mask, masked1);
    if (masked2) sigaddset(&sa.sa_mask, masked2);
    if (sigaction(sig, &sa, NULL)) { perror("sigaction"); _exit(1); }
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_info;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGWINCH);
    sigaddset(&sa.sa_mask, SIGRTMIN + 2);
    sigaction(SIGUSR1, &sa, NULL);
    set(SIGUSR2, on_signal, SA_RESETHAND | SA_NODEFER, 0, 0);
    set(SIGPIPE, SIG_IGN, 0, 0, 0);
    set(SIGHUP, SIG_IGN, SA_RESTART, SIGINT, 0);
    set(SIGTERM, SIG_DFL, SA_RESTART | SA_ONSTACK, SIGQUIT, SIGRTMIN + 5);
    set(SIGCHLD, SIG_DFL, SA_NOCLDSTOP, 0, 0);
    set(SIGRTMIN + 3, on_signal, SA_ONSTACK, SIGALRM, 0);
    set(SIGRTMAX, on_signal, 0, 0, 0);
    raise(SIGUSR2);            /* fires once: SA_RESETHAND leaves SIG_DFL with its flags */
    printf("READY pid=%d\n", (int)getpid());
    fflush(stdout);
    for (;;)
        pause();
}
