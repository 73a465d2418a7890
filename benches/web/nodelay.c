// Diagnostic for benches/web/run.sh --nodelay only: an LD_PRELOAD shim that turns on
// TCP_NODELAY on every socket the node accepts. The node's web listener leaves Nagle's
// algorithm on (crates/node/src/web.rs `serve`; the chat RPC transport sets TCP_NODELAY in
// crates/proto/src/transport.rs), so a frame written while the page has not yet acknowledged
// the previous one waits for the browser's delayed ACK (40 ms on Linux). This shows what
// turning it on would change without rebuilding the node. On sockets that already have it, or
// that are not TCP, the setsockopt is harmless (it fails on Unix sockets, and is ignored).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd) {
  if (fd >= 0) {
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
  int accepted = real(fd, addr, len, flags);
  nodelay(accepted);
  return accepted;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
  int accepted = real(fd, addr, len);
  nodelay(accepted);
  return accepted;
}
