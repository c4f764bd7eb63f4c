/* A passthrough FUSE filesystem whose flock() fails, as run directories on some shared filesystems do:
 * NFS without lockd (ENOLCK), Lustre mounted noflock (ENOSYS). tests/test_checkpoint.py builds and mounts it.
 *
 *   noflock_fs ERRNO BACKING_DIR MOUNTPOINT -f -s
 *
 * It implements .flock (returning -ERRNO), so libfuse asks the kernel to send flock requests here instead of
 * emulating them locally; everything else goes to BACKING_DIR.
 */
#define FUSE_USE_VERSION 31
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *backing;
static int flock_errno;

static void real(char *out, const char *path) { snprintf(out, PATH_MAX, "%s%s", backing, path); }

#define REAL(var, path) char var[PATH_MAX]; real(var, path)
#define CHECK(call) return (call) == -1 ? -errno : 0

static int fs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    if (fi) CHECK(fstat(fi->fh, st));
    REAL(p, path); CHECK(lstat(p, st));
}
static int fs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off, struct fuse_file_info *fi,
                      enum fuse_readdir_flags flags) {
    REAL(p, path);
    DIR *d = opendir(p);
    if (!d) return -errno;
    for (struct dirent *e; (e = readdir(d));) fill(buf, e->d_name, NULL, 0, 0);
    closedir(d);
    return 0;
}
static int fs_mkdir(const char *path, mode_t mode) { REAL(p, path); CHECK(mkdir(p, mode)); }
static int fs_rmdir(const char *path) { REAL(p, path); CHECK(rmdir(p)); }
static int fs_unlink(const char *path) { REAL(p, path); CHECK(unlink(p)); }
static int fs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) { REAL(p, path); CHECK(chmod(p, mode)); }
static int fs_rename(const char *from, const char *to, unsigned int flags) {
    if (flags) return -EINVAL;
    REAL(a, from); REAL(b, to); CHECK(rename(a, b));
}
static int fs_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    if (fi) CHECK(ftruncate(fi->fh, size));
    REAL(p, path); CHECK(truncate(p, size));
}
static int fs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
    REAL(p, path); CHECK(utimensat(AT_FDCWD, p, tv, AT_SYMLINK_NOFOLLOW));
}
static int fs_open(const char *path, struct fuse_file_info *fi) {
    REAL(p, path);
    int fd = open(p, fi->flags);
    if (fd == -1) return -errno;
    fi->fh = fd;
    return 0;
}
static int fs_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    REAL(p, path);
    int fd = open(p, fi->flags, mode);
    if (fd == -1) return -errno;
    fi->fh = fd;
    return 0;
}
static int fs_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    ssize_t n = pread(fi->fh, buf, size, off);
    return n == -1 ? -errno : n;
}
static int fs_write(const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    ssize_t n = pwrite(fi->fh, buf, size, off);
    return n == -1 ? -errno : n;
}
static int fs_fsync(const char *path, int datasync, struct fuse_file_info *fi) { CHECK(fsync(fi->fh)); }
static int fs_release(const char *path, struct fuse_file_info *fi) { close(fi->fh); return 0; }
static int fs_flock(const char *path, struct fuse_file_info *fi, int op) { return -flock_errno; }

static const struct fuse_operations ops = {
    .getattr = fs_getattr, .readdir = fs_readdir, .mkdir = fs_mkdir, .rmdir = fs_rmdir, .unlink = fs_unlink,
    .chmod = fs_chmod, .rename = fs_rename, .truncate = fs_truncate, .utimens = fs_utimens, .open = fs_open,
    .create = fs_create, .read = fs_read, .write = fs_write, .fsync = fs_fsync, .release = fs_release,
    .flock = fs_flock,
};

int main(int argc, char *argv[]) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ERRNO BACKING_DIR MOUNTPOINT [FUSE options]\n", argv[0]);
        return 2;
    }
    flock_errno = atoi(argv[1]);
    backing = realpath(argv[2], NULL);
    if (!backing) { perror(argv[2]); return 2; }
    argv[2] = argv[0];
    return fuse_main(argc - 2, argv + 2, &ops, NULL);
}
