// SPDX-License-Identifier: GPL-2.0
/*
 * kmod-shim: carries the pages of memfds (shmem and hugetlb) and the luo
 * daemon's state blob across a kexec through Kexec HandOver (KHO), using only
 * exported symbols. The daemon keeps every LUO semantic in userspace; this
 * module only stashes and hands back.
 *
 * Old kernel: LUO_SHIM_STASH pins every folio of a file with
 * memfd_pin_folios() and preserves it with kho_preserve_folio(). Pinning is
 * what keeps the folio out of KHO's scratch areas: they are CMA, the next
 * kernel boots from them alone and reserves preserved memory late, so a
 * preserved folio lying there is overwritten. shmem and hugetlb folios are
 * movable and may sit in CMA; memfd_pin_folios() migrates such folios out
 * first (as mm/memfd_luo.c relies on). A folio that cannot be pinned fails
 * the stash. LUO_SHIM_PUBLISH writes the daemon's
 * blob and the folio table into KHO-preserved chunks and names them in the
 * KHO tree (kho_add_subtree("luo-shim")). After that nothing more is stashed
 * until LUO_SHIM_UNPUBLISH (a kexec that did not happen).
 *
 * New kernel: at load, the module finds the subtree, copies the stream out,
 * frees the chunks and restores every folio (kho_restore_folio()). The daemon
 * reads the blob (LUO_SHIM_FETCH), lists the files (LUO_SHIM_FILE), makes a
 * memfd of each one's size and has the module fill it (LUO_SHIM_ADOPT: a
 * shmem file gets the restored folios themselves in its page cache, no copy;
 * see adopt_folio()), or copies the contents itself (LUO_SHIM_READ: hugetlb),
 * and lets the folios go (LUO_SHIM_RELEASE).
 *
 * LUO_SHIM_FREEZE fixes the size of a shmem file as mm/memfd_luo.c does for
 * a preserved memfd (shmem_freeze(): ftruncate, growing writes and fallocate
 * fail with EPERM), and frees it again.
 *
 * While anything is stashed or published the module holds a reference on
 * itself, so it cannot be unloaded under the next kernel's feet.
 */

#include <linux/anon_inodes.h>
#include <linux/build_bug.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/io.h>
#include <linux/kexec_handover.h>
#include <linux/magic.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pagemap.h>
#include <linux/folio_batch.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "luo_shim_uapi.h"

/* The layout shared with cuse-dev/src/shim.rs. */
static_assert(sizeof(struct luo_shim_stash) == 32);
static_assert(sizeof(struct luo_shim_blob) == 16);
static_assert(sizeof(struct luo_shim_info) == 32);
static_assert(sizeof(struct luo_shim_file) == 32);
static_assert(sizeof(struct luo_shim_read) == 32);
static_assert(LUO_SHIM_STASH == 0xc020b701);
static_assert(LUO_SHIM_UNSTASH == 0x4008b702);
static_assert(LUO_SHIM_PUBLISH == 0x4010b703);
static_assert(LUO_SHIM_UNPUBLISH == 0x0000b704);
static_assert(LUO_SHIM_INFO == 0x8020b705);
static_assert(LUO_SHIM_FETCH == 0x4010b706);
static_assert(LUO_SHIM_FILE == 0xc020b707);
static_assert(LUO_SHIM_READ == 0x4020b708);
static_assert(LUO_SHIM_RELEASE == 0x4008b709);
static_assert(sizeof(struct luo_shim_freeze) == 8);
static_assert(sizeof(struct luo_shim_adopt) == 48);
static_assert(LUO_SHIM_FREEZE == 0x4008b70a);
static_assert(LUO_SHIM_ADOPT == 0xc030b70b);
static_assert(LUO_SHIM_MAP == 0x4008b70c);

#define SUBTREE "luo-shim"
#define STREAM_MAGIC 0x314d4948534f554cULL /* "LUOSHIM1" */
#define CHUNK_ORDER min(10, MAX_PAGE_ORDER)
#define CHUNK_SIZE (PAGE_SIZE << CHUNK_ORDER)
#define MAX_BLOB (64UL << 20)

/* What crosses the kexec: a root page naming the chunks of one stream. */
struct root {
	u64 magic;
	u64 stream_len;
	u64 nr_chunks;
	u64 chunk_phys[];
};

#define MAX_CHUNKS ((PAGE_SIZE - sizeof(struct root)) / sizeof(u64))

/* The stream: header, blob, file records, then each file's folio records. */
struct stream_hdr {
	u64 magic;
	u32 version;
	u32 pad;
	u64 blob_len;
	u64 nr_files;
};

struct file_rec {
	u64 token;
	u64 size;
	u32 kind;
	u32 pad;
	u64 nr_folios;
};

struct folio_rec {
	u64 phys;
	u64 index; /* in pages */
	u32 order;
	u32 pad;
};

struct shim_file {
	struct list_head list;
	u64 token;
	u64 size;
	u32 kind;
	struct inode *inode; /* stashed: for double-stash checks */
	unsigned long nr;
	struct folio **folios;
	pgoff_t *index; /* first page of each folio, ascending */
	bool pinned; /* stashed: the folios are pinned, not just referenced */
	struct inode *adopted; /* restored: the file ADOPT fills (held, so never another's) */
	unsigned int adopting; /* ADOPT calls at work on it (RELEASE waits) */
	bool broken; /* restored with folios missing: reads fail with EIO */
};

static bool timing;
module_param(timing, bool, 0644);
MODULE_PARM_DESC(timing, "Log how long each stash spends pinning and preserving");

static DEFINE_MUTEX(shim_lock);
static LIST_HEAD(shim_files);
static int shim_state = LUO_SHIM_OPEN;
static void *shim_blob;
static size_t shim_blob_len;
static struct root *pub_root;
static void *pub_chunks[MAX_CHUNKS];
static bool holding_module;

static void hold_module(void)
{
	if (!holding_module) {
		__module_get(THIS_MODULE);
		holding_module = true;
	}
}

static void maybe_release_module(void)
{
	if (holding_module && list_empty(&shim_files) && shim_state != LUO_SHIM_PUBLISHED) {
		holding_module = false;
		module_put(THIS_MODULE);
	}
}

static struct shim_file *find_token(u64 token)
{
	struct shim_file *f;

	list_for_each_entry(f, &shim_files, list)
		if (f->token == token)
			return f;
	return NULL;
}

static u64 total_bytes(void)
{
	struct shim_file *f;
	u64 n = 0;
	unsigned long i;

	list_for_each_entry(f, &shim_files, list)
		for (i = 0; i < f->nr; i++)
			if (f->folios[i])
				n += folio_size(f->folios[i]);
	return n;
}

static void free_file(struct shim_file *f, bool unpreserve)
{
	unsigned long i;

	for (i = 0; i < f->nr; i++) {
		if (!f->folios[i])
			continue;
		if (unpreserve)
			kho_unpreserve_folio(f->folios[i]);
		if (f->pinned)
			unpin_folio(f->folios[i]);
		else
			folio_put(f->folios[i]);
	}
	if (f->inode)
		iput(f->inode);
	if (f->adopted)
		iput(f->adopted);
	kvfree(f->folios);
	kvfree(f->index);
	list_del(&f->list);
	kfree(f);
}

static int kind_of(struct inode *inode)
{
	if (inode->i_sb->s_magic == HUGETLBFS_MAGIC)
		return LUO_SHIM_HUGETLB;
	if (shmem_mapping(inode->i_mapping))
		return LUO_SHIM_SHMEM;
	return -EINVAL;
}

/*
 * At most this many folios are pinned by one memfd_pin_folios() call: each
 * call that has to migrate drains every CPU's LRU batches once, so runs are
 * long.
 */
#define RUN_MAX 4096

/* Makes room for @more folios in f's arrays. */
static int grow(struct shim_file *f, unsigned long *cap, unsigned long more)
{
	unsigned long want = *cap;
	void *a, *b;

	while (f->nr + more > want)
		want *= 2;
	if (want == *cap)
		return 0;
	a = kvrealloc(f->folios, want * sizeof(*f->folios), GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	f->folios = a;
	b = kvrealloc(f->index, want * sizeof(*f->index), GFP_KERNEL);
	if (!b)
		return -ENOMEM;
	f->index = b;
	*cap = want;
	return 0;
}

/* A run of present folios, adjacent in the file, not yet pinned. */
struct run {
	loff_t start, end;	/* bytes, inclusive */
	unsigned int n;
	pgoff_t index[RUN_MAX];	/* where each folio was found ... */
	unsigned long pfn[RUN_MAX];	/* ... and its frame then */
	struct {		/* one batch of present folios, let go */
		loff_t first, last;
		pgoff_t index;
		unsigned long pfn;
	} seen[FOLIO_BATCH_SIZE];
};

/*
 * Pins the folios covering the run, up to RUN_MAX a call (memfd_pin_folios()
 * allocates what is missing in its range, so it is only given ranges known
 * to be present: a hole punched meanwhile is filled, never skipped). Counts
 * the folios that had to move out of CMA or ZONE_MOVABLE: a pinned folio at
 * a frame other than the one recorded for its index.
 */
static int pin_run(struct shim_file *f, struct file *file, struct run *r,
		   unsigned long *cap, unsigned long *moved)
{
	loff_t start = r->start;
	unsigned int k = 0;

	while (start <= r->end) {
		unsigned long first = f->nr;
		struct folio *last;
		pgoff_t offset;
		long n, i;
		int err = grow(f, cap, RUN_MAX);

		if (err)
			return err;
		n = memfd_pin_folios(file, start, r->end, f->folios + first, RUN_MAX, &offset);
		if (n < 0)
			return n;
		if (n == 0)
			return -EIO;
		for (i = 0; i < n; i++) {
			struct folio *folio = f->folios[first + i];

			f->index[first + i] = folio->index;
			while (k < r->n && r->index[k] < folio->index)
				k++;
			if (k < r->n && r->index[k] == folio->index && r->pfn[k] != folio_pfn(folio))
				(*moved)++;
		}
		f->nr += n;
		last = f->folios[f->nr - 1];
		start = folio_pos(last) + folio_size(last);
	}
	r->n = 0;
	return 0;
}

/*
 * Pins every folio of the file that lies within its size, in index order,
 * a run of adjacent present folios at a time. The present folios are found
 * first and their references dropped: a folio with an extra reference could
 * not be migrated to be pinned.
 */
static int collect_folios(struct shim_file *f, struct file *file, unsigned long *moved)
{
	struct folio_batch fbatch;
	unsigned long cap = 64;
	loff_t size = i_size_read(file_inode(file));
	pgoff_t start = 0;
	struct run *r;
	unsigned int i, n;
	int err = 0;

	f->folios = kvmalloc_array(cap, sizeof(*f->folios), GFP_KERNEL);
	f->index = kvmalloc_array(cap, sizeof(*f->index), GFP_KERNEL);
	r = kvzalloc(sizeof(*r), GFP_KERNEL);
	if (!f->folios || !f->index || !r) {
		kvfree(r);
		return -ENOMEM;
	}
	f->pinned = true;
	folio_batch_init(&fbatch);
	while (!err && (n = filemap_get_folios(file->f_mapping, &start, ULONG_MAX, &fbatch))) {
		/* Noted, then let go: a referenced folio cannot migrate. */
		for (i = 0; i < n; i++) {
			struct folio *folio = fbatch.folios[i];

			r->seen[i].first = folio_pos(folio);
			r->seen[i].last = min_t(loff_t, r->seen[i].first + folio_size(folio), size) - 1;
			r->seen[i].index = folio->index;
			r->seen[i].pfn = folio_pfn(folio);
		}
		folio_batch_release(&fbatch);
		for (i = 0; !err && i < n && r->seen[i].first < size; i++) {
			if (r->n && (r->seen[i].first != r->end + 1 || r->n == RUN_MAX))
				err = pin_run(f, file, r, &cap, moved);
			if (!r->n)
				r->start = r->seen[i].first;
			r->end = r->seen[i].last;
			r->index[r->n] = r->seen[i].index;
			r->pfn[r->n] = r->seen[i].pfn;
			r->n++;
		}
		cond_resched();
	}
	if (!err && r->n)
		err = pin_run(f, file, r, &cap, moved);
	kvfree(r);
	if (!err && *moved)
		pr_info("luo_shim: token %llu: %lu of %lu folios moved out of CMA/ZONE_MOVABLE to be pinned\n",
			f->token, *moved, f->nr);
	return err;
}

static long shim_stash(void __user *uarg)
{
	struct luo_shim_stash a;
	struct shim_file *f, *other;
	struct file *file;
	struct inode *inode;
	unsigned long i, moved = 0;
	ktime_t t0, t1;
	int kind, err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_OPEN)
		return -EBUSY;
	file = fget(a.fd);
	if (!file)
		return -EBADF;
	inode = file_inode(file);
	kind = kind_of(inode);
	if (kind < 0) {
		fput(file);
		return kind;
	}
	if (find_token(a.token)) {
		fput(file);
		return -EEXIST;
	}
	list_for_each_entry(other, &shim_files, list) {
		if (other->inode == inode) {
			fput(file);
			return -EBUSY;
		}
	}
	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f) {
		fput(file);
		return -ENOMEM;
	}
	INIT_LIST_HEAD(&f->list);
	f->token = a.token;
	f->kind = kind;
	f->size = i_size_read(inode);
	t0 = ktime_get();
	err = collect_folios(f, file, &moved);
	t1 = ktime_get();
	for (i = 0; !err && i < f->nr; i++) {
		err = kho_preserve_folio(f->folios[i]);
		if (err) {
			/* Only the ones before were preserved. */
			while (i--)
				kho_unpreserve_folio(f->folios[i]);
		}
	}
	if (err) {
		for (i = 0; i < f->nr; i++)
			unpin_folio(f->folios[i]);
		kvfree(f->folios);
		kvfree(f->index);
		kfree(f);
		fput(file);
		return err;
	}
	if (timing)
		pr_info("luo_shim: token %llu: %llu KiB in %lu folios: pinned in %lld us (%lu moved), preserved in %lld us\n",
			f->token, f->size >> 10, f->nr, ktime_us_delta(t1, t0), moved,
			ktime_us_delta(ktime_get(), t1));
	f->inode = igrab(inode);
	fput(file);
	list_add_tail(&f->list, &shim_files);
	hold_module();
	a.kind = kind;
	a.size = f->size;
	a.folios = f->nr;
	if (copy_to_user(uarg, &a, sizeof(a)))
		return -EFAULT; /* stashed all the same: UNSTASH undoes it */
	return 0;
}

static long shim_unstash(void __user *uarg)
{
	struct shim_file *f;
	u64 token;

	if (copy_from_user(&token, uarg, sizeof(token)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_OPEN)
		return -EBUSY;
	f = find_token(token);
	if (!f)
		return -ENOENT;
	free_file(f, true);
	maybe_release_module();
	return 0;
}

/* Writes through a cursor over the chunks. */
struct cursor {
	void **chunks;
	u64 pos;
};

static void put_bytes(struct cursor *c, const void *src, size_t len)
{
	while (len) {
		u64 chunk = c->pos / CHUNK_SIZE, off = c->pos % CHUNK_SIZE;
		size_t n = min_t(u64, len, CHUNK_SIZE - off);

		memcpy(c->chunks[chunk] + off, src, n);
		src += n;
		len -= n;
		c->pos += n;
	}
}

static void unpublish_chunks(void)
{
	unsigned long i;

	if (!pub_root)
		return;
	for (i = 0; i < pub_root->nr_chunks; i++) {
		kho_unpreserve_free(pub_chunks[i]);
		pub_chunks[i] = NULL;
	}
	kho_unpreserve_free(pub_root);
	pub_root = NULL;
}

static long shim_publish(void __user *uarg)
{
	struct luo_shim_blob b;
	struct stream_hdr hdr = { .magic = STREAM_MAGIC, .version = LUO_SHIM_VERSION };
	struct cursor c = { .chunks = pub_chunks };
	struct shim_file *f;
	u64 len, nr_chunks, i;
	void *blob;
	int err;

	if (copy_from_user(&b, uarg, sizeof(b)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_OPEN)
		return -EBUSY;
	if (b.len > MAX_BLOB)
		return -E2BIG;
	blob = kvmalloc(max_t(u64, b.len, 1), GFP_KERNEL);
	if (!blob)
		return -ENOMEM;
	if (copy_from_user(blob, u64_to_user_ptr(b.addr), b.len)) {
		kvfree(blob);
		return -EFAULT;
	}
	len = sizeof(hdr) + b.len;
	list_for_each_entry(f, &shim_files, list) {
		len += sizeof(struct file_rec) + f->nr * sizeof(struct folio_rec);
		hdr.nr_files++;
	}
	hdr.blob_len = b.len;
	nr_chunks = DIV_ROUND_UP(len, CHUNK_SIZE);
	if (nr_chunks > MAX_CHUNKS) {
		kvfree(blob);
		return -E2BIG;
	}
	pub_root = kho_alloc_preserve(PAGE_SIZE);
	if (IS_ERR(pub_root)) {
		err = PTR_ERR(pub_root);
		pub_root = NULL;
		kvfree(blob);
		return err;
	}
	for (i = 0; i < nr_chunks; i++) {
		u64 left = len - i * CHUNK_SIZE;
		void *chunk = kho_alloc_preserve(min_t(u64, left, CHUNK_SIZE));

		if (IS_ERR(chunk)) {
			err = PTR_ERR(chunk);
			goto fail;
		}
		pub_chunks[i] = chunk;
		pub_root->chunk_phys[i] = virt_to_phys(chunk);
		pub_root->nr_chunks = i + 1;
	}
	pub_root->magic = STREAM_MAGIC;
	pub_root->stream_len = len;
	put_bytes(&c, &hdr, sizeof(hdr));
	put_bytes(&c, blob, b.len);
	list_for_each_entry(f, &shim_files, list) {
		struct file_rec r = {
			.token = f->token, .size = f->size, .kind = f->kind, .nr_folios = f->nr,
		};

		put_bytes(&c, &r, sizeof(r));
	}
	list_for_each_entry(f, &shim_files, list) {
		for (i = 0; i < f->nr; i++) {
			struct folio_rec r = {
				.phys = PFN_PHYS(folio_pfn(f->folios[i])),
				.index = f->index[i],
				.order = folio_order(f->folios[i]),
			};

			put_bytes(&c, &r, sizeof(r));
		}
	}
	err = kho_add_subtree(SUBTREE, pub_root, PAGE_SIZE);
	if (err)
		goto fail;
	kvfree(shim_blob);
	shim_blob = blob;
	shim_blob_len = b.len;
	shim_state = LUO_SHIM_PUBLISHED;
	hold_module();
	return 0;
fail:
	unpublish_chunks();
	kvfree(blob);
	return err;
}

static long shim_unpublish(void)
{
	if (shim_state != LUO_SHIM_PUBLISHED)
		return -EINVAL;
	kho_remove_subtree(pub_root);
	unpublish_chunks();
	shim_state = LUO_SHIM_OPEN;
	maybe_release_module();
	return 0;
}

static long shim_info(void __user *uarg)
{
	struct luo_shim_info i = {
		.version = LUO_SHIM_VERSION,
		.state = shim_state,
		.blob_len = shim_blob_len,
		.bytes = total_bytes(),
	};
	struct shim_file *f;

	list_for_each_entry(f, &shim_files, list)
		i.files++;
	return copy_to_user(uarg, &i, sizeof(i)) ? -EFAULT : 0;
}

static long shim_fetch(void __user *uarg)
{
	struct luo_shim_blob b;

	if (copy_from_user(&b, uarg, sizeof(b)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_RESTORED)
		return -ENOENT;
	if (b.len < shim_blob_len)
		return -ENOSPC;
	if (copy_to_user(u64_to_user_ptr(b.addr), shim_blob, shim_blob_len))
		return -EFAULT;
	return 0;
}

static long shim_file_at(void __user *uarg)
{
	struct luo_shim_file a;
	struct shim_file *f;
	u64 n = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	list_for_each_entry(f, &shim_files, list) {
		if (n++ == a.index) {
			a.token = f->token;
			a.size = f->size;
			a.kind = f->kind;
			a.pad = 0;
			return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
		}
	}
	return -ENOENT;
}

/*
 * The position in @f of the folio holding page @pgoff, or -1 for a hole. A
 * restored folio's own ->index means nothing: f->index says where it goes.
 */
static long folio_at(struct shim_file *f, pgoff_t pgoff)
{
	unsigned long lo = 0, hi = f->nr;

	while (lo < hi) {
		unsigned long mid = lo + (hi - lo) / 2;

		if (f->index[mid] <= pgoff)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0 || !f->folios[lo - 1])
		return -1;
	if (pgoff >= f->index[lo - 1] + folio_nr_pages(f->folios[lo - 1]))
		return -1;
	return lo - 1;
}

static long shim_read(void __user *uarg)
{
	struct luo_shim_read a;
	struct shim_file *f;
	char __user *dst;
	u64 pos, end;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_RESTORED)
		return -ENOENT;
	f = find_token(a.token);
	if (!f)
		return -ENOENT;
	if (f->broken)
		return -EIO;
	if (check_add_overflow(a.offset, a.len, &end) || end > f->size)
		return -EINVAL;
	dst = u64_to_user_ptr(a.addr);
	for (pos = a.offset; pos < end;) {
		pgoff_t pgoff = pos >> PAGE_SHIFT;
		size_t off = offset_in_page(pos);
		size_t n = min_t(u64, PAGE_SIZE - off, end - pos);
		long k = folio_at(f, pgoff);
		unsigned long left;

		if (k >= 0) {
			void *src = kmap_local_folio(f->folios[k], (pgoff - f->index[k]) * PAGE_SIZE);

			left = copy_to_user(dst, src + off, n);
			kunmap_local(src);
		} else {
			left = clear_user(dst, n);
		}
		if (left)
			return -EFAULT;
		dst += n;
		pos += n;
		if (!(pgoff & 511))
			cond_resched();
	}
	return 0;
}

/*
 * Copies restored folio @src (whose first page belongs at page @index) into
 * the shmem file page by page, as a write would: a page-cache folio met for
 * the first time gets the rest of it zeroed before it is marked up to date.
 */
static int copy_folio(struct inode *inode, struct folio *src, pgoff_t index)
{
	long i;

	for (i = 0; i < folio_nr_pages(src); i++) {
		struct folio *dst;
		size_t off;
		void *from, *to;
		int err = shmem_get_folio(inode, index + i, (loff_t)(index + i + 1) << PAGE_SHIFT,
					  &dst, SGP_WRITE);

		if (err)
			return err;
		off = (index + i - dst->index) << PAGE_SHIFT;
		from = kmap_local_folio(src, i << PAGE_SHIFT);
		to = kmap_local_folio(dst, off);
		memcpy(to, from, PAGE_SIZE);
		kunmap_local(to);
		kunmap_local(from);
		if (!folio_test_uptodate(dst)) {
			folio_zero_segments(dst, 0, off, off + PAGE_SIZE, folio_size(dst));
			folio_mark_uptodate(dst);
		}
		folio_mark_dirty(dst);
		folio_unlock(dst);
		folio_put(dst);
	}
	return 0;
}

/*
 * Puts restored folio @k of @f into the shmem file. shmem's own insertion is
 * not exported, so shmem_get_folio(SGP_WRITE) makes an accounted slot (a
 * fresh folio: inode blocks, memcg charge) and replace_page_cache_folio()
 * swaps the restored folio into it, moving the charge and the NR_FILE_PAGES
 * and NR_SHMEM counts; the fresh folio is then freed. That swap stores one
 * xarray slot and takes one reference, so it is right for order-0 folios on
 * both sides only; any other pairing is copied. The module keeps its own
 * reference until RELEASE, so READ still works after a failed ADOPT.
 */
/* With timing: where ADOPT's time goes. */
struct adopt_times {
	u64 slot_ns, swap_ns;
};

static int adopt_folio(struct shim_file *f, unsigned long k, struct inode *inode, bool *moved,
		       struct adopt_times *times)
{
	struct folio *new = f->folios[k], *old;
	pgoff_t index = f->index[k];
	ktime_t t0 = timing ? ktime_get() : 0, t1;
	int err;

	*moved = false;
	if (new->mapping) /* placed by an earlier, interrupted ADOPT */
		return 0;
	if (folio_order(new))
		return copy_folio(inode, new, index);
	err = shmem_get_folio(inode, index, (loff_t)(index + 1) << PAGE_SHIFT, &old, SGP_WRITE);
	if (err)
		return err;
	t1 = timing ? ktime_get() : 0;
	if (folio_order(old) || folio_test_uptodate(old)) {
		/* Not a slot made for us: a large folio, or data already there. */
		folio_unlock(old);
		folio_put(old);
		return copy_folio(inode, new, index);
	}
	__folio_set_locked(new);
	__folio_set_swapbacked(new);
	folio_mark_uptodate(new);
	replace_page_cache_folio(old, new);
	folio_mark_dirty(new);
	folio_add_lru(new);
	folio_unlock(new);
	folio_unlock(old);
	folio_put(old);
	*moved = true;
	if (timing) {
		times->slot_ns += ktime_to_ns(ktime_sub(t1, t0));
		times->swap_ns += ktime_to_ns(ktime_sub(ktime_get(), t1));
	}
	return 0;
}

/*
 * Checks an ADOPT of @a into @file and marks the file busy. Runs under
 * shim_lock; the folios are then placed without it, so that several ADOPTs
 * of disjoint ranges of one file run at once, on every CPU.
 */
static struct shim_file *adopt_begin(struct luo_shim_adopt *a, struct file *file, int *err)
{
	struct inode *inode = file_inode(file);
	struct shim_file *f;

	*err = -ENOENT;
	if (shim_state != LUO_SHIM_RESTORED)
		return NULL;
	f = find_token(a->token);
	if (!f)
		return NULL;
	*err = -EIO;
	if (f->broken)
		return NULL;
	*err = -EINVAL;
	if (f->kind != LUO_SHIM_SHMEM || kind_of(inode) != LUO_SHIM_SHMEM ||
	    i_size_read(inode) != f->size)
		return NULL;
	*err = -EBADF;
	if (!(file->f_mode & FMODE_WRITE))
		return NULL;
	/*
	 * One file only, held until RELEASE: if its filler dies, a new ADOPT
	 * into another file is refused (the daemon then copies through READ),
	 * and the folios already placed stay where they are.
	 */
	*err = -EBUSY;
	if (f->adopted && f->adopted != inode)
		return NULL;
	if (!f->adopted) {
		f->adopted = igrab(inode);
		if (!f->adopted)
			return NULL;
	}
	*err = 0;
	f->adopting++;
	return f;
}

static long shim_adopt(void __user *uarg)
{
	struct luo_shim_adopt a;
	struct adopt_times times = {};
	struct shim_file *f;
	struct inode *inode;
	struct file *file;
	unsigned long k, end;
	ktime_t t0 = ktime_get();
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	file = fget(a.fd);
	if (!file)
		return -EBADF;
	inode = file_inode(file);
	mutex_lock(&shim_lock);
	f = adopt_begin(&a, file, &err);
	mutex_unlock(&shim_lock);
	if (!f)
		goto out;
	/* The file's folios stay put while adopting > 0: RELEASE and MAP wait. */
	end = a.count ? min_t(u64, f->nr, a.first + a.count) : f->nr;
	a.moved = a.copied = 0;
	for (k = a.first; !err && k < end; k++) {
		bool moved;

		if (!f->folios[k])
			continue;
		err = adopt_folio(f, k, inode, &moved, &times);
		if (!err)
			moved ? a.moved++ : a.copied++;
		if (!(k & 63))
			cond_resched();
	}
	if (timing)
		pr_info("luo_shim: token %llu: folios %llu..%lu of %lu adopted in %lld us (%llu moved, %llu copied; slots %llu us, swaps %llu us): %d\n",
			f->token, a.first, end, f->nr, ktime_us_delta(ktime_get(), t0), a.moved,
			a.copied, times.slot_ns / 1000, times.swap_ns / 1000, err);
	mutex_lock(&shim_lock);
	f->adopting--;
	mutex_unlock(&shim_lock);
	if (!err && copy_to_user(uarg, &a, sizeof(a)))
		err = -EFAULT;
out:
	fput(file);
	return err;
}

static long shim_freeze(void __user *uarg)
{
	struct luo_shim_freeze a;
	struct file *file;
	struct inode *inode;
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.frozen > 1)
		return -EINVAL;
	file = fget(a.fd);
	if (!file)
		return -EBADF;
	inode = file_inode(file);
	if (kind_of(inode) != LUO_SHIM_SHMEM) {
		err = -EINVAL;
	} else {
		/* shmem reads the flag under i_rwsem (setattr, write_begin, fallocate). */
		inode_lock(inode);
		shmem_freeze(inode, a.frozen);
		inode_unlock(inode);
	}
	fput(file);
	return err;
}

/*
 * LUO_SHIM_MAP: the restored folios themselves, mapped through a file of
 * the module's own (no copy, no memfd: no seals, not hugetlbfs, cannot be
 * stashed again). Faults hand out the restored pages; a hole is SIGBUS.
 */
static vm_fault_t map_fault(struct vm_fault *vmf)
{
	struct shim_file *f = vmf->vma->vm_file->private_data;
	long k = folio_at(f, vmf->pgoff);
	struct page *page;

	if (k < 0)
		return VM_FAULT_SIGBUS;
	page = folio_page(f->folios[k], vmf->pgoff - f->index[k]);
	get_page(page);
	vmf->page = page;
	return 0;
}

static const struct vm_operations_struct map_vm_ops = {
	.fault = map_fault,
};

static int map_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct shim_file *f = file->private_data;
	u64 pages = DIV_ROUND_UP(f->size, PAGE_SIZE);

	if (vma->vm_pgoff > pages || vma_pages(vma) > pages - vma->vm_pgoff)
		return -EINVAL;
	vm_flags_set(vma, VM_DONTEXPAND | VM_DONTDUMP);
	vma->vm_ops = &map_vm_ops;
	return 0;
}

static int map_release(struct inode *inode, struct file *file)
{
	struct shim_file *f = file->private_data;

	free_file(f, false); /* off shim_files since MAP: list_del is harmless */
	return 0;
}

static const struct file_operations map_fops = {
	.owner = THIS_MODULE,
	.mmap = map_mmap,
	.release = map_release,
};

static long shim_map(void __user *uarg)
{
	struct shim_file *f;
	u64 token;
	int fd;

	if (copy_from_user(&token, uarg, sizeof(token)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_RESTORED)
		return -ENOENT;
	f = find_token(token);
	if (!f)
		return -ENOENT;
	if (f->broken || f->adopted || f->adopting)
		return f->broken ? -EIO : -EBUSY;
	fd = anon_inode_getfd("luo-shim-file", &map_fops, f, O_RDWR | O_CLOEXEC);
	if (fd >= 0)
		list_del_init(&f->list);
	return fd;
}

static long shim_release_file(void __user *uarg)
{
	struct shim_file *f;
	u64 token;

	if (copy_from_user(&token, uarg, sizeof(token)))
		return -EFAULT;
	if (shim_state != LUO_SHIM_RESTORED)
		return -EINVAL;
	f = find_token(token);
	if (!f)
		return -ENOENT;
	if (f->adopting)
		return -EBUSY;
	free_file(f, false);
	return 0;
}

static long shim_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;
	long ret;

	/* Touches one inode and no shim state: never waits for a stash. */
	if (cmd == LUO_SHIM_FREEZE)
		return shim_freeze(uarg);
	/* Takes the lock itself, only to start and to end. */
	if (cmd == LUO_SHIM_ADOPT)
		return shim_adopt(uarg);
	mutex_lock(&shim_lock);
	switch (cmd) {
	case LUO_SHIM_STASH:
		ret = shim_stash(uarg);
		break;
	case LUO_SHIM_UNSTASH:
		ret = shim_unstash(uarg);
		break;
	case LUO_SHIM_PUBLISH:
		ret = shim_publish(uarg);
		break;
	case LUO_SHIM_UNPUBLISH:
		ret = shim_unpublish();
		break;
	case LUO_SHIM_INFO:
		ret = shim_info(uarg);
		break;
	case LUO_SHIM_FETCH:
		ret = shim_fetch(uarg);
		break;
	case LUO_SHIM_FILE:
		ret = shim_file_at(uarg);
		break;
	case LUO_SHIM_READ:
		ret = shim_read(uarg);
		break;
	case LUO_SHIM_RELEASE:
		ret = shim_release_file(uarg);
		break;
	case LUO_SHIM_MAP:
		ret = shim_map(uarg);
		break;
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&shim_lock);
	return ret;
}

static const struct file_operations shim_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = shim_ioctl,
};

static struct miscdevice shim_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "luo-shim",
	.fops = &shim_fops,
	.mode = 0600,
};

/* Bounds-checked reads from the restored stream. */
struct reader {
	const void *buf;
	u64 len, pos;
};

static const void *take(struct reader *r, u64 n)
{
	const void *p;

	if (n > r->len - r->pos)
		return NULL;
	p = r->buf + r->pos;
	r->pos += n;
	return p;
}

/* Builds the restored files from the stream; folios are restored here. */
static int parse_stream(struct reader *r)
{
	const struct stream_hdr *hdr = take(r, sizeof(*hdr));
	const struct file_rec *recs;
	const void *blob;
	u64 i, j;

	if (!hdr || hdr->magic != STREAM_MAGIC || hdr->version != LUO_SHIM_VERSION)
		return -EINVAL;
	blob = take(r, hdr->blob_len);
	if (!blob || hdr->nr_files > r->len / sizeof(*recs))
		return -EINVAL;
	recs = take(r, hdr->nr_files * sizeof(*recs));
	if (!recs)
		return -EINVAL;
	shim_blob = kvmalloc(max_t(u64, hdr->blob_len, 1), GFP_KERNEL);
	if (!shim_blob)
		return -ENOMEM;
	memcpy(shim_blob, blob, hdr->blob_len);
	shim_blob_len = hdr->blob_len;
	for (i = 0; i < hdr->nr_files; i++) {
		const struct folio_rec *fr;
		struct shim_file *f;

		if (recs[i].nr_folios > r->len / sizeof(*fr))
			return -EINVAL;
		fr = take(r, recs[i].nr_folios * sizeof(*fr));
		if (!fr)
			return -EINVAL;
		f = kzalloc(sizeof(*f), GFP_KERNEL);
		if (!f)
			return -ENOMEM;
		INIT_LIST_HEAD(&f->list);
		f->token = recs[i].token;
		f->size = recs[i].size;
		f->kind = recs[i].kind;
		f->folios = kvcalloc(max_t(u64, recs[i].nr_folios, 1), sizeof(*f->folios), GFP_KERNEL);
		f->index = kvcalloc(max_t(u64, recs[i].nr_folios, 1), sizeof(*f->index), GFP_KERNEL);
		list_add_tail(&f->list, &shim_files);
		if (!f->folios || !f->index)
			return -ENOMEM;
		f->nr = recs[i].nr_folios;
		for (j = 0; j < f->nr; j++) {
			f->index[j] = fr[j].index;
			f->folios[j] = kho_restore_folio(fr[j].phys);
			if (!f->folios[j] && !f->broken) {
				pr_err("luo-shim: token %llu: folio %llu at %#llx (order %u) did not come back\n",
				       f->token, j, fr[j].phys, fr[j].order);
				f->broken = true;
			}
		}
	}
	return 0;
}

/* Reads the stream the previous kernel published, if any. */
static int restore_stream(void)
{
	struct reader r = {};
	struct root *root;
	phys_addr_t phys;
	u64 i, len, nr;
	void *stream;
	int err;

	if (!is_kho_boot() || kho_retrieve_subtree(SUBTREE, &phys, NULL))
		return 0;
	root = phys_to_virt(phys);
	len = root->stream_len;
	nr = root->nr_chunks;
	if (root->magic != STREAM_MAGIC || nr > MAX_CHUNKS || len > nr * CHUNK_SIZE) {
		pr_err("luo-shim: the previous kernel's stream is damaged; ignored\n");
		return 0;
	}
	stream = kvmalloc(max_t(u64, len, 1), GFP_KERNEL);
	if (!stream)
		return -ENOMEM;
	for (i = 0; i < nr; i++) {
		void *chunk = phys_to_virt(root->chunk_phys[i]);

		memcpy(stream + i * CHUNK_SIZE, chunk, min_t(u64, len - i * CHUNK_SIZE, CHUNK_SIZE));
		kho_restore_free(chunk);
	}
	kho_restore_free(root);
	r.buf = stream;
	r.len = len;
	err = parse_stream(&r);
	kvfree(stream);
	shim_state = LUO_SHIM_RESTORED;
	if (err)
		pr_err("luo-shim: restoring the previous kernel's files failed: %d\n", err);
	else
		pr_info("luo-shim: %llu bytes of files and a %zu-byte blob came back\n",
			total_bytes(), shim_blob_len);
	return 0;
}

static int __init shim_init(void)
{
	int err = restore_stream();

	if (err)
		return err;
	return misc_register(&shim_dev);
}

static void __exit shim_exit(void)
{
	struct shim_file *f, *n;

	misc_deregister(&shim_dev);
	/* Only restored files can be left here (stashes hold the module). */
	list_for_each_entry_safe(f, n, &shim_files, list)
		free_file(f, false);
	kvfree(shim_blob);
}

module_init(shim_init);
module_exit(shim_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Carries memfd pages and the luo daemon's state across kexec through KHO");
