/*
 * ctlsock: a tiny control channel over a unix socket, for the sidekick example.
 *
 *   ctlsock serve PATH      accept connections on PATH; print each received line on
 *                           stdout and answer "ok LINE"
 *   ctlsock send PATH MSG   send MSG, print the answer; exit 1 if nobody listens
 *   ctlsock post PATH ENDPOINT JSON
 *                           POST JSON to ENDPOINT of the HTTP server on PATH (e.g. the
 *                           volume's scoped volplugin socket), print the answer's body;
 *                           exit 0 if the status is 200, 1 otherwise
 *
 * Build it static so it runs in a busybox image:  gcc -static -O2 -o ctlsock ctlsock.c
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int address(const char *path, struct sockaddr_un *addr) {
    memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr->sun_path)) {
        fprintf(stderr, "ctlsock: socket path too long: %s\n", path);
        return -1;
    }
    strcpy(addr->sun_path, path);
    return 0;
}

static int serve(const char *path) {
    struct sockaddr_un addr;
    if (address(path, &addr) < 0) return 1;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    unlink(path);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 16) < 0) {
        fprintf(stderr, "ctlsock: cannot listen on %s: %s\n", path, strerror(errno));
        return 1;
    }
    for (;;) {
        int conn = accept(fd, NULL, NULL);
        if (conn < 0) continue;
        char line[256];
        ssize_t n = read(conn, line, sizeof(line) - 1);
        if (n > 0) {
            line[n] = '\0';
            line[strcspn(line, "\r\n")] = '\0';
            printf("%s\n", line);
            fflush(stdout);
            dprintf(conn, "ok %s\n", line);
        }
        close(conn);
    }
}

static int send_msg(const char *path, const char *msg) {
    struct sockaddr_un addr;
    if (address(path, &addr) < 0) return 1;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        fprintf(stderr, "ctlsock: cannot connect to %s: %s\n", path, strerror(errno));
        return 1;
    }
    dprintf(fd, "%s\n", msg);
    char reply[256];
    ssize_t n = read(fd, reply, sizeof(reply) - 1);
    close(fd);
    if (n <= 0) {
        fprintf(stderr, "ctlsock: no answer from %s\n", path);
        return 1;
    }
    reply[n] = '\0';
    fputs(reply, stdout);
    return 0;
}

static int post(const char *path, const char *endpoint, const char *json) {
    struct sockaddr_un addr;
    if (address(path, &addr) < 0) return 1;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        fprintf(stderr, "ctlsock: cannot connect to %s: %s\n", path, strerror(errno));
        return 1;
    }
    dprintf(fd,
            "POST %s HTTP/1.0\r\nHost: localhost\r\n"
            "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
            endpoint, strlen(json), json);
    static char answer[1 << 20];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof(answer) - 1 && (n = read(fd, answer + got, sizeof(answer) - 1 - got)) > 0)
        got += (size_t)n;
    close(fd);
    answer[got] = '\0';
    int status = 0;
    if (sscanf(answer, "HTTP/%*s %d", &status) != 1) {
        fprintf(stderr, "ctlsock: no HTTP answer from %s\n", path);
        return 1;
    }
    char *body = strstr(answer, "\r\n\r\n");
    if (body) printf("%s\n", body + 4);
    return status == 200 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) return serve(argv[2]);
    if (argc == 4 && strcmp(argv[1], "send") == 0) return send_msg(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "post") == 0) return post(argv[2], argv[3], argv[4]);
    fprintf(stderr,
            "usage: ctlsock serve PATH | ctlsock send PATH MESSAGE | "
            "ctlsock post PATH ENDPOINT JSON\n");
    return 2;
}
