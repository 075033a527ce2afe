/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The interface between the luo daemon and kmod-shim (/dev/luo-shim).
 * cuse-dev/src/shim.rs mirrors every struct and number here; both sides
 * check sizes and ioctl numbers at compile time.
 */
#ifndef LUO_SHIM_UAPI_H
#define LUO_SHIM_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define LUO_SHIM_VERSION 1
#define LUO_SHIM_TYPE 0xB7

/* Kinds of stashed file. */
#define LUO_SHIM_SHMEM 1
#define LUO_SHIM_HUGETLB 2

/* States of the shim. */
#define LUO_SHIM_OPEN 0		/* taking stashes */
#define LUO_SHIM_PUBLISHED 1	/* blob published for the next kernel */
#define LUO_SHIM_RESTORED 2	/* came up with what the previous kernel left */

struct luo_shim_stash {
	__s32 fd;	/* in: a shmem or hugetlbfs file (a memfd) */
	__u32 kind;	/* out: LUO_SHIM_SHMEM or LUO_SHIM_HUGETLB */
	__u64 token;	/* in: the daemon's name for it */
	__u64 size;	/* out: i_size */
	__u64 folios;	/* out: folios preserved */
};

struct luo_shim_blob {
	__u64 addr;	/* user buffer */
	__u64 len;	/* its length */
};

struct luo_shim_info {
	__u32 version;
	__u32 state;
	__u64 blob_len;	/* the daemon's blob (restored or published) */
	__u64 files;	/* stashed or restored files */
	__u64 bytes;	/* bytes of folios they hold */
};

struct luo_shim_file {
	__u64 index;	/* in: 0 .. info.files - 1 */
	__u64 token;	/* out */
	__u64 size;	/* out */
	__u32 kind;	/* out */
	__u32 pad;
};

struct luo_shim_read {
	__u64 token;
	__u64 offset;	/* byte offset in the file */
	__u64 addr;	/* user buffer */
	__u64 len;
};

struct luo_shim_freeze {
	__s32 fd;	/* a shmem file */
	__u32 frozen;	/* 1: its size is fixed, as mm/memfd_luo.c fixes it; 0: free */
};

struct luo_shim_adopt {
	__u64 token;	/* a restored file */
	__s32 fd;	/* in: a writable shmem file of the restored size */
	__u32 pad;
	__u64 first;	/* in: the first of its folios (in file order) to place */
	__u64 count;	/* in: how many (0: all from first); ranges may run at once */
	__u64 moved;	/* out: folios put into the file's page cache as they are */
	__u64 copied;	/* out: folios copied (their size differs from the file's) */
};

#define LUO_SHIM_STASH _IOWR(LUO_SHIM_TYPE, 1, struct luo_shim_stash)
#define LUO_SHIM_UNSTASH _IOW(LUO_SHIM_TYPE, 2, __u64)
#define LUO_SHIM_PUBLISH _IOW(LUO_SHIM_TYPE, 3, struct luo_shim_blob)
#define LUO_SHIM_UNPUBLISH _IO(LUO_SHIM_TYPE, 4)
#define LUO_SHIM_INFO _IOR(LUO_SHIM_TYPE, 5, struct luo_shim_info)
#define LUO_SHIM_FETCH _IOW(LUO_SHIM_TYPE, 6, struct luo_shim_blob)
#define LUO_SHIM_FILE _IOWR(LUO_SHIM_TYPE, 7, struct luo_shim_file)
#define LUO_SHIM_READ _IOW(LUO_SHIM_TYPE, 8, struct luo_shim_read)
#define LUO_SHIM_RELEASE _IOW(LUO_SHIM_TYPE, 9, __u64)
#define LUO_SHIM_FREEZE _IOW(LUO_SHIM_TYPE, 10, struct luo_shim_freeze)
#define LUO_SHIM_ADOPT _IOWR(LUO_SHIM_TYPE, 11, struct luo_shim_adopt)
/* Hands a restored file's folios to a new fd (returned) that maps them. */
#define LUO_SHIM_MAP _IOW(LUO_SHIM_TYPE, 12, __u64)

#endif
