/* A socket audit for test servers, loaded with LD_PRELOAD: every name lookup and every connect
 * or sendto with an address, from Python or from native code (onnxruntime resolves and connects
 * in C++, where Python's audit hooks see nothing), is appended as one line
 *     <pid> <call> <target>
 * to the file named by IDFUSION_NETAUDIT_LOG. Calls that stay on the machine (loopback, Unix
 * sockets) go on to the C library; the others fail there (EAI_NONAME, ENETUNREACH), so a test
 * never sends anything out, even when what it tests is broken. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void note(const char *call, const char *target) {
    const char *path = getenv("IDFUSION_NETAUDIT_LOG");
    if (path == NULL) return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[600];
    int n = snprintf(line, sizeof line, "%d %s %s\n", (int)getpid(), call, target);
    if (n > (int)sizeof line - 1) n = (int)sizeof line - 1;
    if (n > 0 && write(fd, line, (size_t)n) < 0) { /* nothing to do: the audit must never fail a call */ }
    close(fd);
}

static int local_name(const char *node) {
    return node == NULL || strcmp(node, "localhost") == 0 || strcmp(node, "::1") == 0 ||
           strcmp(node, "ip6-localhost") == 0 || strcmp(node, "ip6-loopback") == 0 || strncmp(node, "127.", 4) == 0;
}

static int local_address(const struct sockaddr *addr, socklen_t len) {
    if (addr == NULL || len < sizeof(sa_family_t)) return 1;
    if (addr->sa_family == AF_UNIX || addr->sa_family == AF_UNSPEC) return 1;
    if (addr->sa_family == AF_INET) {
        return (ntohl(((const struct sockaddr_in *)addr)->sin_addr.s_addr) >> 24) == 127;
    }
    if (addr->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)addr)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

static void describe(const struct sockaddr *addr, socklen_t len, char *out, size_t size) {
    char host[INET6_ADDRSTRLEN] = "?";
    if (addr == NULL || len < sizeof(sa_family_t)) {
        snprintf(out, size, "none");
    } else if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        snprintf(out, size, "inet %s %d", host, ntohs(in->sin_port));
    } else if (addr->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        snprintf(out, size, "inet6 %s %d", host, ntohs(in6->sin6_port));
    } else if (addr->sa_family == AF_UNIX) {
        snprintf(out, size, "unix %s", ((const struct sockaddr_un *)addr)->sun_path);
    } else {
        snprintf(out, size, "family %d", addr->sa_family);
    }
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    static int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
    if (real == NULL) real = dlsym(RTLD_NEXT, "getaddrinfo");
    char target[300];
    snprintf(target, sizeof target, "%s %s", node ? node : "(none)", service ? service : "(none)");
    note("getaddrinfo", target);
    if (!local_name(node)) return EAI_NONAME;
    return real(node, service, hints, res);
}

struct hostent *gethostbyname(const char *name) {
    static struct hostent *(*real)(const char *);
    if (real == NULL) real = dlsym(RTLD_NEXT, "gethostbyname");
    note("gethostbyname", name ? name : "(none)");
    if (!local_name(name)) {
        h_errno = HOST_NOT_FOUND;
        return NULL;
    }
    return real(name);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (real == NULL) real = dlsym(RTLD_NEXT, "connect");
    char target[300];
    describe(addr, len, target, sizeof target);
    note("connect", target);
    if (!local_address(addr, len)) {
        errno = ENETUNREACH;
        return -1;
    }
    return real(fd, addr, len);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t len) {
    static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    if (real == NULL) real = dlsym(RTLD_NEXT, "sendto");
    if (addr != NULL) {
        char target[300];
        describe(addr, len, target, sizeof target);
        note("sendto", target);
        if (!local_address(addr, len)) {
            errno = ENETUNREACH;
            return -1;
        }
    }
    return real(fd, buf, n, flags, addr, len);
}
